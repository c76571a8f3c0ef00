"""LLaVA's symbolic image context: captions, then normalised object boxes (and, for negatives, absent objects)."""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.coco import ImageRecord, normalised_box, read_instance_categories  # noqa: F401  (normalised_box re-exported)
from datagen.errors import VisinstructError
from datagen.splits import SPLIT_SPECS, SplitSpec

# The line that lists absent objects in a negative split's context (the gate and review read it back).
ABSENT_LABEL = "Absent objects"
DEFAULT_ABSENT_OBJECTS = 3


def render_context(record: ImageRecord, with_boxes: bool, absent: Iterable[str] = ()) -> str:
    """Captions one per line; with boxes, a blank line and `category: [x1, y1, x2, y2]` lines; then absent objects."""
    text = "\n".join(record.captions)
    if with_boxes and record.objects:
        # str() of a float list prints floats the way LLaVA's files show them (0.23, 1.0).
        boxes = "\n".join(f"{o.category}: {normalised_box(o, record.width, record.height)}" for o in record.objects)
        text = f"{text}\n\n{boxes}"
    absent = list(absent)
    if absent:
        text = f"{text}\n\n{ABSENT_LABEL}: {', '.join(absent)}"
    return text


@dataclass
class CooccurrenceTable:
    """How many images contain both of two categories, and how many contain each (from an instances file)."""

    pairs: Counter = field(default_factory=Counter)
    singles: Counter = field(default_factory=Counter)
    categories: tuple[str, ...] = ()

    @classmethod
    def from_image_categories(cls, per_image: Iterable[set[str]], categories: Iterable[str]) -> "CooccurrenceTable":
        """Count over the category sets of many images."""
        table = cls(categories=tuple(sorted(categories)))
        for present in per_image:
            table.singles.update(present)
            ordered = sorted(present)
            for i, a in enumerate(ordered):
                for b in ordered[i + 1:]:
                    table.pairs[(a, b)] += 1
        return table

    @classmethod
    def from_coco(cls, index: Any) -> "CooccurrenceTable":
        """From a CocoIndex opened with instances (its boxed categories per image)."""
        return cls.from_image_categories(index.category_sets(), index.categories.values())

    @classmethod
    def from_file(cls, path: Path) -> "CooccurrenceTable":
        """From an instances JSON file in COCO's format, streamed and checked by the COCO reader."""
        names, per_image = read_instance_categories(Path(path))
        return cls.from_image_categories(per_image, names)

    def together(self, a: str, b: str) -> int:
        """Images holding both categories."""
        return self.pairs[(a, b) if a < b else (b, a)]

    def score(self, candidate: str, present: Iterable[str]) -> float:
        """Sum over present categories of P(candidate | present): high when it usually appears beside them."""
        return sum(self.together(candidate, p) / self.singles[p] for p in present if self.singles[p])


def pick_absent_objects(
    present: set[str], table: CooccurrenceTable, count: int, seed: int, image_id: int
) -> list[str]:
    """The `count` absent categories most likely beside the present ones (POPE's adversarial choice).

    Ties (e.g. categories never seen together with these) are broken by a per (seed, image) shuffle, so the
    choice is deterministic for a seed and independent of processing order.
    """
    candidates = [c for c in table.categories if c not in present]
    random.Random(f"absent:{seed}:{image_id}").shuffle(candidates)
    candidates.sort(key=lambda c: -table.score(c, present))  # stable: the shuffle orders ties
    return candidates[:count]


@dataclass
class ContextBuilder:
    """The context text of one split for one image, plus what a sample should remember of it (meta)."""

    split: str
    cooccurrence: CooccurrenceTable | None = None
    seed: int = 0
    absent_count: int = DEFAULT_ABSENT_OBJECTS
    # The categories an image's captions name (they count as present, as in the gate's ground truth).
    caption_categories: Callable[[list[str]], set[str]] | None = None
    spec: SplitSpec = field(init=False)

    def __post_init__(self) -> None:
        spec = SPLIT_SPECS.get(self.split)
        if spec is None:
            raise VisinstructError(f"unknown split {self.split!r}", f"use one of {', '.join(SPLIT_SPECS)}")
        self.spec = spec
        if spec.with_absent_objects and self.cooccurrence is None:
            raise VisinstructError(f"the {self.split} split needs object co-occurrence counts",
                                   "load the split's instances file or pass --cooccurrence-from FILE")

    def absent_objects(self, record: ImageRecord) -> list[str]:
        """Absent categories for a negative sample: no box and not named by a caption."""
        if not self.spec.with_absent_objects or self.cooccurrence is None:
            return []
        present = {o.category for o in record.objects}
        if self.caption_categories is not None:
            present |= set(self.caption_categories(list(record.captions)))
        return pick_absent_objects(present, self.cooccurrence, self.absent_count, self.seed, record.id)

    def render(self, record: ImageRecord) -> tuple[str, dict[str, Any]]:
        """(context text, meta entries for the sample)."""
        absent = self.absent_objects(record)
        text = render_context(record, with_boxes=self.spec.with_boxes, absent=absent)
        return text, ({"absent_objects": absent} if absent else {})


def absent_from_context(context: str) -> list[str]:
    """The absent objects a context listed (its `Absent objects:` line), or none."""
    for line in reversed(context.splitlines()):
        if line.startswith(f"{ABSENT_LABEL}:"):
            return [name.strip() for name in line.split(":", 1)[1].split(",") if name.strip()]
    return []


def context_meta(split: str, context: str) -> dict[str, Any]:
    """What a sample keeps of its context: the absent objects of a negative sample."""
    spec = SPLIT_SPECS.get(split)
    if spec is None or not spec.with_absent_objects:
        return {}
    return {"absent_objects": absent_from_context(context)}


def context_builder(split: str, coco: Any = None, cooccurrence_from: Path | None = None, seed: int = 0,
                    absent_count: int = DEFAULT_ABSENT_OBJECTS) -> ContextBuilder:
    """The builder for a split: co-occurrence from the given instances file, else from the split's own (`coco`, a CocoIndex)."""
    table = None
    if SPLIT_SPECS.get(split) is not None and SPLIT_SPECS[split].with_absent_objects:
        if cooccurrence_from is not None:
            table = CooccurrenceTable.from_file(cooccurrence_from)
        elif coco is not None:
            table = CooccurrenceTable.from_coco(coco)
    return ContextBuilder(split, table, seed, absent_count, captioned_categories if table is not None else None)


def captioned_categories(captions: list[str]) -> set[str]:
    """The categories captions name, by the shipped matcher (a module function, so a builder pickles for Ray)."""
    # Imported here, not at the top: datagen.quality's checks import this module (normalised_box).
    from datagen.quality.objects import default_matcher

    return default_matcher().categories_of_each(captions)
