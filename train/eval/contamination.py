"""Contamination guard: evaluation images must not be training images.

COCO 2014 and 2017 hold one image pool under two naming schemes (COCO_val2014_000000391895.jpg and
000000391895.jpg name the same photo), so images are compared by their numeric COCO id, never by name.
Training ids come from the checkpoint's run folder: the data report's `image_ids` when the trainer wrote
them, else the data files named in each stage's saved config.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datagen.errors import VisinstructError
from datagen.sample import read_samples

_TRAILING_ID = re.compile(r"(\d+)(?:\.[A-Za-z0-9]+)?$")


def image_id_of(name: str | int) -> int | None:
    """The COCO image id in a file name or sample id (`COCO_train2014_000000000009.jpg`, `000000000009`)."""
    if isinstance(name, int):
        return name
    match = _TRAILING_ID.search(Path(str(name)).name)
    return int(match.group(1)) if match else None


def ids_in_data_file(path: Path) -> set[int]:
    """COCO image ids of the samples of a LLaVA-format JSON/JSONL file (by their `image` field)."""
    rows = read_samples(Path(path))  # datagen's one sample reader: bad bytes or JSON name the file and line
    ids = {image_id_of(r["image"]) for r in rows if r.get("image")}
    return {i for i in ids if i is not None}


@dataclass
class TrainingImages:
    """Image ids a checkpoint was trained on, and where they were read from."""

    ids: set[int] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # data files the config names that are gone


def _stage_dirs(checkpoint: Path) -> list[Path]:
    """Folders that may hold a stage's config.yaml / data_report.json for this exported checkpoint."""
    checkpoint = checkpoint.resolve()
    candidates = [checkpoint, checkpoint.parent]  # a report written beside the model, or in a stage dir
    for run_dir in (checkpoint.parent, checkpoint.parent.parent):
        candidates += sorted(run_dir.glob("stage*"))
    # A stage's own export (runs/x/stage1/final) saw that stage and the earlier ones, not the later ones.
    last = _stage_of(checkpoint.parent) or 99
    seen: list[Path] = []
    for c in candidates:
        if c.is_dir() and c not in seen and ((c / "config.yaml").is_file() or (c / "data_report.json").is_file()) \
                and (_stage_of(c) or 0) <= last:
            seen.append(c)
    return seen


def _stage_of(directory: Path) -> int | None:
    match = re.fullmatch(r"stage(\d)", directory.name)
    return int(match.group(1)) if match else None


def training_images(checkpoint: Path) -> TrainingImages:
    """Every image id the checkpoint's run trained on (all stages), from its data report or config."""
    found = TrainingImages()
    for directory in _stage_dirs(Path(checkpoint)):
        report_path = directory / "data_report.json"
        report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if isinstance(report.get("image_ids"), list):
            found.ids |= {i for i in map(image_id_of, report["image_ids"]) if i is not None}
            found.sources.append(str(report_path))
            continue
        config_path = directory / "config.yaml"
        if not config_path.is_file():
            continue
        config = yaml.safe_load(config_path.read_text()) or {}
        stages = [_stage_of(directory)] if _stage_of(directory) else [1, 2]
        for n in stages:
            for name in (config.get(f"stage{n}") or {}).get("data") or []:
                path = Path(name)
                if path.is_file():
                    found.ids |= ids_in_data_file(path)
                    found.sources.append(str(path))
                elif str(path) not in found.missing:
                    found.missing.append(str(path))
    return found


def split_clean(eval_ids: list[int], trained: set[int]) -> tuple[list[int], list[int]]:
    """(ids not trained on, ids trained on), each in the given order."""
    return [i for i in eval_ids if i not in trained], [i for i in eval_ids if i in trained]


def guard(eval_ids: list[int], checkpoint: Path, drop: bool, what: str,
          also: Sequence[Path] = ()) -> tuple[list[int], int, TrainingImages]:
    """The evaluation ids to use; refuses on any overlap unless `drop`, which removes and counts it.

    `also`: other checkpoints whose training images are left out too (the other side of an A/B, so that
    both are evaluated on the same images)."""
    trained = training_images(checkpoint)
    for other in also:
        theirs = training_images(other)
        trained.ids |= theirs.ids
        trained.sources += [s for s in theirs.sources if s not in trained.sources]
        trained.missing += [m for m in theirs.missing if m not in trained.missing]
    if trained.missing:
        raise VisinstructError(
            f"the training data files {', '.join(trained.missing)} named by the run's config are gone, so overlap cannot be checked",
            "restore them, or pass --no-contamination-check if you know the data is clean")
    if not trained.sources:
        raise VisinstructError(
            f"no training data record found for {checkpoint} (no stage*/config.yaml or data_report.json beside it)",
            "evaluate a run folder's final/ export, or pass --no-contamination-check if you know the data is clean")
    clean, overlap = split_clean(eval_ids, trained.ids)
    if overlap and not drop:
        raise VisinstructError(
            f"{len(overlap)} of {len(eval_ids)} {what} images were used in training (e.g. id {overlap[0]})",
            "evaluate on other images, or pass --drop-contaminated to leave them out")
    return clean, len(overlap), trained
