"""Cost of the issue-11 checks: QualityChecker over the template-composed family samples, with and without them.

Run: python bench/split_checks_bench.py --coco-root ../shared/coco-mini
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from datagen.quality import QualityChecker, QualityConfig, SampleView
from datagen.quality.eval_samples import build_records
from datagen.quality.gate import open_lookup

NEW_CODES = ["wrong_count", "wrong_position", "absent_not_denied", "absent_object_named", "malformed_box",
             "invented_box", "no_box"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-root", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lookup = open_lookup(args.coco_root, "val2017")
    views = [SampleView.from_record(r, record=lookup.find(r["image"])) for r in build_records("dev", args.coco_root)]
    configs = {
        "all checks": QualityConfig(disabled_checks=["near_duplicate"]),
        "without the new codes, strict object check": QualityConfig(
            disabled_checks=["near_duplicate", *NEW_CODES], lenient_object_mentions=False),
    }
    for name, config in configs.items():
        best = float("inf")
        for _ in range(args.repeats):
            checker = QualityChecker(config)
            checker.env.matcher._scans.clear()  # the shared matcher remembers texts: start each repeat cold
            started = time.perf_counter()
            for view in views:
                checker.check(view)
            best = min(best, time.perf_counter() - started)
        print(f"{name}: {len(views)} samples in {best:.2f} s = {len(views) / best:.0f} samples/s (best of {args.repeats})")


if __name__ == "__main__":
    main()
