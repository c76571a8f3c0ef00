"""What the input layer (issue 9) costs: reading JSONL samples and streaming a COCO file, before and after.

Side by side in one run, same files, alternating rounds:
- JSONL: the reader before issue 9 (text mode, json.loads per line) against datagen.inputs.iter_jsonl_records
  (bytes decoded strictly per line, NaN refused, nesting bounded, lone surrogates refused);
- COCO: datagen.coco_stream.stream_top_level as it was at commit b35f3f6 (loaded from git) against the current
  one (per-element line tracking, binary input decoded incrementally), each building the captions reader.

    python bench/input_layer_bench.py --samples 50000 --annotations 200000 --rounds 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datagen.coco_index import _CaptionsReader  # noqa: E402
from datagen.coco_stream import stream_top_level  # noqa: E402
from datagen.inputs import iter_jsonl_records  # noqa: E402

BEFORE = "b35f3f6"  # main just before the input layer


def old_iter_jsonl(path: Path):
    """The JSONL reader as it was before issue 9."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def old_stream_module():
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:datagen/coco_stream.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_coco_stream.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_coco_stream", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_files(folder: Path, samples: int, annotations: int) -> tuple[Path, Path]:
    good = json.loads((REPO / "tests" / "fixtures" / "good_samples.jsonl").read_text().splitlines()[0])
    jsonl = folder / "detail.jsonl"
    with open(jsonl, "w", encoding="utf-8") as fh:
        for i in range(samples):
            fh.write(json.dumps({**good, "id": f"{i:012d}", "meta": {"objects": [[0.1, 0.2, 0.3, 0.4]] * 8}}) + "\n")
    coco = folder / "captions.json"
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(annotations // 5)]
    anns = [{"id": k, "image_id": k // 5, "caption": f"A photo number {k} of a cat on a mat. "} for k in range(annotations)]
    coco.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}, indent=1))
    return jsonl, coco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--annotations", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    old_stream = old_stream_module()
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, coco = write_files(Path(tmp), args.samples, args.annotations)
        runs = {
            "jsonl before": lambda: sum(1 for _ in old_iter_jsonl(jsonl)),
            "jsonl input layer": lambda: sum(1 for _ in iter_jsonl_records(jsonl)),
            "coco before": lambda: _stream(old_stream.stream_top_level, open(coco, encoding="utf-8")),
            "coco input layer": lambda: _stream(stream_top_level, open(coco, "rb")),
        }
        sizes = {"jsonl": jsonl.stat().st_size / 1e6, "coco": coco.stat().st_size / 1e6}
        best: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                counts[name] = run()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    for name in runs:
        size = sizes[name.split()[0]]
        print(f"{name:20s} {best[name]:7.3f} s  {size / best[name]:6.1f} MB/s  ({counts[name]} records, {size:.1f} MB)")
    print(f"ratio jsonl: {best['jsonl input layer'] / best['jsonl before']:.2f}x, "
          f"coco: {best['coco input layer'] / best['coco before']:.2f}x (input layer / before; best of {args.rounds})")


def _stream(stream_fn, fh) -> int:
    reader = _CaptionsReader()
    with fh:
        stream_fn(fh, reader.start, reader.element)
    reader.finish()
    return len(reader.captions.ends)


if __name__ == "__main__":
    main()
