"""`make data`'s settings, measured: best-of-N and decoding settings with the embedded model on coco-mini.

For each setting, the three LLaVA splits run together on one loaded model (as `make data` runs them), over the
same first `--images` images of val2017, without a response cache. Reported per setting: accepted per image,
completion tokens per accepted sample, reject reasons, wall and CPU seconds (with the load average around it).
One JSON line per setting is appended to `--out` as it finishes, so a long sweep keeps what it measured.

    nice -n 10 python bench/make_data_sweep.py --images 4 --max-tokens 384 \
        --setting n=1 --setting n=2 --setting n=4 --setting rp=1.2 --setting ngram=3 --setting t=0.3

A setting is comma-separated `n=`, `rp=` (repetition penalty), `ngram=` (no-repeat n-gram size), `t=`
(temperature), `bs=` (batch size); unnamed fields keep `make data`'s values.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datagen.backends.local import LocalBackend  # noqa: E402
from datagen.cli.generate import prepare_split  # noqa: E402
from datagen.engine.config import EngineConfig  # noqa: E402
from datagen.executors.local import make_judge, run_local  # noqa: E402
from datagen.run_config import GenerateConfig  # noqa: E402
from datagen.sample import OutputLayout  # noqa: E402

SPLITS = ("conversation", "detail", "reasoning")
FIELDS = {"n": ("candidates", int), "rp": ("repetition_penalty", float), "ngram": ("no_repeat_ngram_size", int),
          "t": ("temperature", float), "bs": ("batch_size", int)}


def parse_setting(text: str) -> dict:
    setting: dict = {}
    for part in filter(None, text.split(",")):
        name, value = part.split("=", 1)
        field, kind = FIELDS[name]
        setting[field] = kind(value)
    return setting


async def run_setting(backend: LocalBackend, coco_root: Path, images: int, max_tokens: int, setting: dict,
                      out_dir: Path) -> dict:
    sampling = {k: v for k, v in setting.items() if k != "batch_size"}
    base = GenerateConfig.model_validate({
        "source": {"split": SPLITS[0], "coco_root": coco_root, "limit": images},
        "model": {"backend": "local"}, "sampling": {"max_tokens": max_tokens, **sampling},
        "cache": {"no_cache": True}, "out_dir": out_dir})
    runs = [prepare_split(base.for_split(split)) for split in SPLITS]
    backend.batch_size = setting.get("batch_size", backend.batch_size)
    concurrency = backend.batch_size
    try:
        results = await asyncio.gather(*(
            run_local(run.task, run.config.layout(), backend, run.index.records(run.ids), EngineConfig(), concurrency,
                      None, set(), make_judge(run.task, concurrency)) for run in runs))
    finally:
        await backend.aclose()
    per_split = {}
    for run, stats in zip(runs, results):
        per_split[run.split] = {"accepted": stats.accepted, "rejected": stats.rejected,
                                "completion_tokens": stats.completion_tokens, "reasons": stats.reject_reasons}
        layout = OutputLayout(out_dir / f"{run.split}.jsonl")
        per_split[run.split]["kept_from_candidates"] = sum(
            1 for line in (layout.samples.read_text().splitlines() if layout.samples.exists() else [])
            if json.loads(line).get("meta", {}).get("candidates", {}).get("kept", 0) != 0)
    return per_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "coco-mini")
    parser.add_argument("--images", type=int, default=4, help="images per split")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--setting", action="append", default=[], help="e.g. n=2,rp=1.1 (repeat)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "make_data_sweep.jsonl")
    args = parser.parse_args()
    settings = [parse_setting(s) for s in (args.setting or ["n=1"])]
    started, cpu = time.perf_counter(), time.process_time()
    backend = LocalBackend(batch_size=args.batch_size)
    load = {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    print(f"model loaded: {load}", flush=True)
    for setting, text in zip(settings, args.setting or ["n=1"]):
        loadavg_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            per_split = asyncio.run(run_setting(backend, args.coco_root, args.images, args.max_tokens, setting, Path(tmp)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        images = args.images * len(SPLITS)
        accepted = sum(s["accepted"] for s in per_split.values())
        tokens = sum(s["completion_tokens"] for s in per_split.values())
        line = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "setting": text, "images": images,
                "max_tokens": args.max_tokens, "accepted_per_image": round(accepted / images, 3),
                "tokens_per_accepted": round(tokens / accepted) if accepted else None, "completion_tokens": tokens,
                "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": round(loadavg_before, 2),
                "load_after": round(os.getloadavg()[0], 2), "model_load": load, "heads_computed": backend._heads.computed,
                "splits": per_split}
        print(json.dumps(line), flush=True)
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
