"""Export: mix splits in set proportions into the JSON array LLaVA's trainer reads."""
from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.errors import VisinstructError
from datagen.sample import (ImagePathError, SampleWriter, image_path_problem, read_samples, resolve_image,
                            sample_split, split_from_filename)

log = logging.getLogger(__name__)

# LLaVA-Instruct-158K: conversation_58k, detail_23k, complex_reasoning_77k.
LLAVA_MIX: dict[str, float] = {"conversation": 58 / 158, "detail": 23 / 158, "reasoning": 77 / 158}
LLAVA_KEYS = ("id", "image", "conversations")


def parse_mix(text: str | None) -> dict[str, float] | None:
    """"conversation=0.37,detail=0.15" -> normalised weights; None/"llava" -> LLaVA's; "none" -> keep all."""
    if text is None or text.strip().lower() == "llava":
        return dict(LLAVA_MIX)
    if text.strip().lower() in ("none", "all"):
        return None
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name.strip() or weight < 0 or not math.isfinite(weight):
            raise VisinstructError(f"bad --mix entry {part!r}", "write split=weight pairs, e.g. conversation=0.37,detail=0.15,reasoning=0.48")
        weights[name.strip()] = weight
    total = sum(weights.values())
    if total <= 0:
        raise VisinstructError("--mix weights sum to zero", "give at least one split a positive weight")
    return {name: w / total for name, w in weights.items() if w > 0}


def plan_counts(available: dict[str, int], mix: dict[str, float] | None, total: int | None) -> dict[str, int]:
    """How many samples of each split to take: the largest set with the mix's proportions (capped at total)."""
    if mix is None:
        counts = dict(available)
        if total is not None and total < sum(counts.values()):
            scale = total / sum(counts.values())
            counts = {s: math.floor(n * scale) for s, n in counts.items()}
        return counts
    missing = [s for s in mix if not available.get(s)]
    if missing:
        raise VisinstructError(
            f"--mix asks for split(s) with no samples: {', '.join(missing)} (have: {', '.join(sorted(available)) or 'none'})",
            "pass --mix with the splits you have, e.g. --mix detail=1, or --mix none to keep everything",
        )
    # The scarcest split relative to its weight limits the size of the whole mix.
    size = min(available[s] / w for s, w in mix.items())
    if total is not None:
        size = min(size, total)
    return {s: min(available[s], math.floor(w * size + 1e-9)) for s, w in mix.items()}


@dataclass
class ExportReport:
    """What an export took, dropped and renamed."""

    written: int = 0
    per_split: Counter = field(default_factory=Counter)
    available: Counter = field(default_factory=Counter)
    skipped_rejected: int = 0
    missing_images: int = 0
    bad_image_paths: int = 0
    renamed_ids: int = 0
    duplicate_ids: int = 0  # second copies of a (split, id) dropped

    def as_dict(self) -> dict[str, Any]:
        return {
            "written": self.written, "per_split": dict(sorted(self.per_split.items())),
            "available": dict(sorted(self.available.items())), "skipped_rejected": self.skipped_rejected,
            "missing_images": self.missing_images, "bad_image_paths": self.bad_image_paths,
            "renamed_ids": self.renamed_ids, "duplicate_ids": self.duplicate_ids,
        }


class FirstCopies:
    """Keeps the first sample of each (split, id): a file given twice, or an output two runs both wrote to,
    must not put one sample into training data twice. (One image's samples of different splits share an id;
    those are all kept, and the export makes their ids unique.)"""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def first(self, split: str, rec: dict[str, Any]) -> bool:
        key = (split, str(rec.get("id")))
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def relative_image(image: str, images_dir: Path, image_folder: Path) -> str:
    """The image's path relative to the trainer's --image-folder."""
    full = (images_dir / image).resolve()
    rel = os.path.relpath(full, image_folder.resolve())
    if rel.startswith(".."):
        raise VisinstructError(
            f"image {full} is outside --image-folder {image_folder}",
            "pass an --image-folder that contains the images (e.g. the COCO root) or a matching --images-dir",
        )
    return Path(rel).as_posix()


def image_is_safe(rec: dict[str, Any], base: Path | None) -> bool:
    """Whether the sample's image (if it has one) passes the path rule, inside `base` when a folder is known.

    A text-only sample (no image key, or null/empty) passes; anything else that is not a plain relative
    name inside the folder does not, and no command copies it into training data.
    """
    image = rec.get("image")
    if image is None or image == "":
        return True
    if base is None:
        return image_path_problem(image) is None
    try:
        resolve_image(base, image)
    except ImagePathError:
        return False
    return True


def export_samples(
    paths: list[Path],
    out: Path,
    mix: dict[str, float] | None,
    seed: int = 0,
    total: int | None = None,
    image_folder: Path | None = None,
    images_dir: Path | None = None,
    keep_missing: bool = False,
    keep_meta: bool = False,
    split: str | None = None,
) -> ExportReport:
    """Read the files, keep accepted samples, mix, shuffle deterministically and write them (.json: one array, else JSONL)."""
    report = ExportReport()
    by_split: dict[str, list[dict[str, Any]]] = {}
    copies = FirstCopies()
    for path in paths:
        fallback = split or split_from_filename(path)
        for rec in read_samples(path):
            if rec.get("reject_reasons"):
                report.skipped_rejected += 1
                continue
            name = split or sample_split(rec, fallback)
            if not image_is_safe(rec, Path(images_dir or image_folder) if image_folder is not None else None):
                report.bad_image_paths += 1  # never copied, even with --keep-missing
                continue
            if name is None:
                raise VisinstructError(
                    f"cannot tell the split of the samples in {path}",
                    'add a "split" field, name the file after its split (detail.jsonl), or pass --split',
                )
            if not copies.first(name, rec):
                report.duplicate_ids += 1
                continue
            by_split.setdefault(name, []).append(rec)
    if report.duplicate_ids:
        log.warning("%d samples whose split and id were already read dropped (kept the first copy)", report.duplicate_ids)
    if image_folder is not None:
        base = images_dir or image_folder
        for name, recs in by_split.items():
            kept = []
            for rec in recs:
                image = rec.get("image")
                if image and not (Path(base) / image).is_file():
                    report.missing_images += 1
                    if not keep_missing:
                        continue
                if image:
                    rec = {**rec, "image": relative_image(image, Path(base), Path(image_folder))}
                kept.append(rec)
            by_split[name] = kept
        if report.missing_images:
            log.warning("%d samples name images not found under %s%s", report.missing_images, base,
                        "" if keep_missing else " (dropped)")
    if report.bad_image_paths:
        log.warning("%d samples with an image path outside the image folder (absolute, '..', a URL, a link out) "
                    "dropped; `datagen check` lists them as bad_image_path", report.bad_image_paths)
    report.available.update({s: len(r) for s, r in by_split.items()})
    counts = plan_counts(dict(report.available), mix, total)
    chosen: list[tuple[str, dict[str, Any]]] = []
    for name in sorted(counts):
        recs = by_split[name]
        # Seeded per split, so adding a file of another split does not change this split's pick.
        picked = random.Random(f"{seed}:{name}").sample(range(len(recs)), counts[name])
        chosen.extend((name, recs[i]) for i in sorted(picked))
    random.Random(seed).shuffle(chosen)
    seen: set[str] = set()
    # Written beside `out` and renamed over it at the end: a failure leaves an earlier export as it was.
    with SampleWriter(Path(out)) as writer:  # out's extension decides: .json an array, else JSONL
        for i, (name, rec) in enumerate(chosen):
            entry = dict(rec) if keep_meta else {k: rec[k] for k in LLAVA_KEYS if k in rec}
            entry["id"] = _unique_id(str(rec.get("id", i)), name, seen)
            if entry["id"] != str(rec.get("id", i)):
                report.renamed_ids += 1
            writer.write(entry)
            report.per_split[name] += 1
    report.written = len(chosen)
    return report


def _unique_id(sample_id: str, split: str, seen: set[str]) -> str:
    """The id itself if new, else id-split, else id-split-2, ... (one image often has several samples)."""
    candidate = sample_id
    if candidate in seen:
        candidate = f"{sample_id}-{split}"
        n = 2
        while candidate in seen:
            candidate = f"{sample_id}-{split}-{n}"
            n += 1
    seen.add(candidate)
    return candidate
