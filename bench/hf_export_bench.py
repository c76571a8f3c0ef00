"""Peak memory and time of `datagen export --format hf` at growing sizes: flat memory means streaming works.

Each size runs `datagen export` in a fresh process and reads its peak RSS (ru_maxrss of the child).
Samples are the fixture samples with new ids, cycling over coco-mini's val2017 images.

    python bench/hf_export_bench.py --sizes 2000 20000 [--embed-images] [--work /tmp/hf-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "good_samples.jsonl"
COCO_VAL = REPO.parent / "shared" / "coco-mini" / "val2017"


def write_samples(path: Path, n: int) -> None:
    """n samples per split file, in generate's format (meta included), streamed to disk."""
    base = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    images = sorted(p.name for p in COCO_VAL.glob("*.jpg"))
    meta = {"backend": "openai", "prompt_hash": "bench", "seed": 0, "model": "bench-model",
            "usage": {"prompt_tokens": 900, "completion_tokens": 200}, "finish_reason": "stop"}
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            rec = dict(base[i % len(base)])
            rec.update(id=f"{i:012d}", image=images[i % len(images)], meta=meta)
            fh.write(json.dumps(rec) + "\n")


def run_export(src: Path, out: Path, embed: bool) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one export in a child process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "datagen.cli", "export", str(src), "--format", "hf", "--out", str(out),
           "--image-root", str(COCO_VAL)] + (["--embed-images"] if embed else [])
    start = time.perf_counter()
    # A wrapper process per run, so RUSAGE_CHILDREN holds this export's peak alone.
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    return seconds, int(done.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--embed-images", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf-export-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for n in args.sizes:
        src = args.work / f"detail-{n}.jsonl"
        if not src.exists():
            write_samples(src, n)
        out = args.work / f"hf-{n}"
        seconds, peak = run_export(src, out, args.embed_images)
        size = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 2**20
        print(f"{n:>7} samples  embed={args.embed_images!s:5}  {seconds:6.1f} s  peak RSS {peak:6.0f} MiB  "
              f"input {src.stat().st_size / 2**20:6.1f} MiB  Parquet {size:7.1f} MiB  "
              f"load {os.getloadavg()[0]:.2f}")
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
