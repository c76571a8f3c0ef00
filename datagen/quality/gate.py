"""The quality gate over samples: a per-sample checker, and `datagen check` over existing files.

Generation judges through `datagen.task.LlavaTask`, which decides near-duplicates in run order.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.coco import CocoIndex, ImageRecord
from datagen.errors import VisinstructError
from datagen.outputs import commit_together
from datagen.jsonl import repair_tail
from datagen.quality.checks import QualityChecker, SampleView
from datagen.quality.config import QualityConfig
from datagen.quality.io import ImageLookup
from datagen.sample import Sample, SampleWriter, read_samples, sample_split, split_from_filename
from datagen.quality.objects import ChairCounter


class Reasons(list):
    """Reject reason codes, carrying what failed: `details` maps each code to a sentence (the objects, the box...)."""

    def __init__(self, codes: list[str], details: dict[str, str]) -> None:
        super().__init__(codes)
        self.details = details


def make_checker(
    split: str, config: QualityConfig | None = None, coco_available: bool = True, seen: Path | None = None
) -> Callable[[Sample, ImageRecord, Any], list[str]]:
    """Reject reason codes per (sample, record, completion), near-duplicates decided in call order.

    `seen`: an output file an earlier run already accepted samples into; a resumed run checks new
    samples against those too.
    """
    checker = QualityChecker(config)
    if seen is not None and Path(seen).is_file():
        repair_tail(Path(seen))  # a killed run may have left half a line; the run would cut it anyway
        for rec in read_samples(Path(seen)):
            checker.remember(SampleView.from_record(rec, split=split))

    def check(sample: Sample, record: ImageRecord, completion: Any) -> list[str]:
        view = SampleView.from_sample(
            sample, split=split, finish_reason=getattr(completion, "finish_reason", None),
            record=record if coco_available else None,
        )
        report = checker.check(view)
        return Reasons(report.reasons, report.details)

    return check


@dataclass
class CheckSummary:
    """Counts of one `datagen check` run."""

    total: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    chair: ChairCounter = field(default_factory=ChairCounter)
    object_check: str = "on"
    images_not_in_coco: int = 0
    splits: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "accepted": self.accepted, "rejected": self.rejected,
            "reject_reasons": dict(sorted(self.reasons.items())), "splits": dict(sorted(self.splits.items())),
            "object_check": self.object_check, "images_not_in_coco": self.images_not_in_coco,
            "chair": self.chair.as_dict(),
        }


def open_lookup(coco_root: Path | None, coco_split: str) -> ImageLookup | None:
    """COCO records by image name, or None when no COCO root was given."""
    if coco_root is None:
        return None
    return ImageLookup(CocoIndex(coco_root, coco_split, with_instances=True))


def check_file(
    path: Path,
    accepted_out: Path | None,
    rejected_out: Path | None,
    config: QualityConfig,
    lookup: ImageLookup | None,
    split: str | None = None,
) -> CheckSummary:
    """Check every sample of a file; accepted ones written unchanged, rejected ones with reject_reasons."""
    for out in (accepted_out, rejected_out):
        if out is not None and Path(out).exists() and Path(out).resolve() == Path(path).resolve():
            raise VisinstructError(f"{out} is also the input file", "write the accepted and rejected samples to new files")
    summary = CheckSummary(object_check="on" if lookup else "skipped (no --coco-root)")
    checker = QualityChecker(config)
    fallback = split or split_from_filename(path)
    # Both files are written beside their targets and put in place only when every sample is checked: a bad
    # line halfway leaves earlier --out-accepted/--out-rejected files as they were.
    accepted = SampleWriter(accepted_out, flag="--out-accepted") if accepted_out else None
    rejected = None
    try:
        rejected = SampleWriter(rejected_out, flag="--out-rejected") if rejected_out else None
        for rec in read_samples(path):
            if "conversations" not in rec:
                # An unparsed generation reject: nothing to check, its stored reasons stand.
                summary.total += 1
                summary.rejected += 1
                summary.splits[split or sample_split(rec, fallback) or "unknown"] += 1
                summary.reasons.update(str(r) for r in rec["reject_reasons"])
                if rejected:
                    rejected.write(rec)
                continue
            record = lookup.find(rec.get("image")) if lookup else None
            if lookup and record is None and rec.get("image"):
                summary.images_not_in_coco += 1
            sample_split_name = split or sample_split(rec, fallback)
            view = SampleView.from_record(rec, split=sample_split_name, record=record)
            report = checker.check(view)
            summary.total += 1
            summary.splits[sample_split_name or "unknown"] += 1
            if report.objects_checked:
                summary.chair.add(report.mentioned, report.hallucinated)
            if report.accepted:
                summary.accepted += 1
                if accepted:
                    accepted.write(rec)
            else:
                summary.rejected += 1
                summary.reasons.update(report.reasons)
                if rejected:
                    # Earlier reasons (a rejects file checked again) are replaced by this run's.
                    rejected.write({**rec, "reject_reasons": report.reasons, "reject_details": report.details})
    except BaseException:
        for writer in (accepted, rejected):
            if writer:
                writer.abort()
        raise
    commit_together(*(w for w in (accepted, rejected) if w))
    return summary
