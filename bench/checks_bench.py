"""CPU cost of the quality gate per sample, on the samples `make bench-datagen` generates (deterministic).

Builds N conversation samples exactly as the benchmark does (coco-mini records -> request context -> the fake
endpoint's completion text -> parsed Sample), then times `make_checker("conversation")` over them, several
rounds, each with a fresh checker (the near-duplicate index starts empty, as in a run). Prints one JSON line.

Run: .venv/bin/python bench/checks_bench.py [--count 2000] [--rounds 5] [--profile]
     [--without CODE ...]  (also time the gate with these checks off, rounds interleaved: the cost of those checks)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from bench_workload import workload  # noqa: E402
from fake_openai_server import completion_text  # noqa: E402

from datagen.backends.base import Completion, SamplingParams  # noqa: E402
from datagen.coco import ImageRecord  # noqa: E402
from datagen.parse import build_sample  # noqa: E402
from datagen.prompts import load_prompt_set  # noqa: E402
from datagen.quality import make_checker  # noqa: E402
from datagen.quality.config import QualityConfig  # noqa: E402
from datagen.sample import Sample, sample_id  # noqa: E402
from datagen.task import LlavaTask  # noqa: E402


def bench_samples(count: int) -> list[tuple[Sample, ImageRecord, Completion]]:
    """The benchmark's (sample, record, completion) triples, built the way the engine builds them."""
    task = LlavaTask("conversation", load_prompt_set(None, "conversation"), SamplingParams())
    out = []
    for record in workload(count):
        context = task.prepare(record).context
        text = completion_text(context)
        completion = Completion(text=text, finish_reason="stop", prompt_tokens=0, completion_tokens=len(text) // 4,
                                model="gpt-4o-mini")
        sample = build_sample(split="conversation", text=text, sample_id=sample_id(record.id), image=record.file_name,
                              instruction=None, meta={"finish_reason": "stop"})
        out.append((sample, record, completion))
    return out


def run_once(items: list[tuple[Sample, ImageRecord, Completion]], disabled: tuple[str, ...] = ()) -> tuple[float, Counter]:
    """CPU seconds for one fresh checker over all items, and the reject reasons it gave."""
    check = make_checker("conversation", QualityConfig(disabled_checks=list(disabled)))
    reasons: Counter = Counter()
    started = time.process_time()
    for sample, record, completion in items:
        reasons.update(check(sample, record, completion) or ["accepted"])
    return time.process_time() - started, reasons


def main() -> None:
    """Time the checker; print CPU µs per sample (median and best of the rounds) and the outcome counts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one round instead")
    parser.add_argument("--without", nargs="*", default=[], metavar="CODE",
                        help="also time the gate with these checks disabled, rounds interleaved")
    args = parser.parse_args()
    items = bench_samples(args.count)
    run_once(items[:50])  # warm caches (synonym table, compiled patterns)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(run_once, items)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    times, reasons, without_times = [], Counter(), []
    for _ in range(args.rounds):
        cpu, reasons = run_once(items)
        times.append(cpu)
        if args.without:
            without_times.append(run_once(items, tuple(args.without))[0])
    per_sample = [1e6 * t / len(items) for t in times]
    result = {"samples": len(items), "rounds": args.rounds, "cpu_us_per_sample_median": round(statistics.median(per_sample), 1),
              "cpu_us_per_sample_best": round(min(per_sample), 1), "outcomes": dict(sorted(reasons.items()))}
    if args.without:
        off = [1e6 * t / len(items) for t in without_times]
        result["without"] = {"checks": args.without, "cpu_us_per_sample_median": round(statistics.median(off), 1),
                             "cpu_us_per_sample_best": round(min(off), 1)}
        result["cost_of_those_checks_us_per_sample_best"] = round(min(per_sample) - min(off), 1)
        result["ratio_best"] = round(min(per_sample) / min(off), 3)
    print(json.dumps(result))

if __name__ == "__main__":
    main()
