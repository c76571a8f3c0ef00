"""POPE (Li et al. 2023): yes/no object-existence questions built from COCO instances, and their scores.

Each image gets `per_image` questions about objects it contains (ground-truth boxes) and as many about
objects it does not, drawn one of three ways: random (any absent category), popular (the most frequent
categories of the annotation file) or adversarial (the categories that co-occur most with the image's own).
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from datagen.errors import VisinstructError
from datagen.inputs import load_json

SAMPLINGS = ("random", "popular", "adversarial")
QUESTION_TEMPLATE = "Is there a {} in the image?"
# POPE's parser reads the first sentence and calls it "no" if one of these words is in it, else "yes".
NEGATIVE_WORDS = frozenset({"no", "not"})


@dataclass(frozen=True)
class CocoObjects:
    """What POPE needs from an instances file: per-image category sets and file names, category names."""

    categories_of: dict[int, frozenset[str]]
    file_names: dict[int, str]

    @classmethod
    def from_instances(cls, path: Path) -> "CocoObjects":
        """Read a COCO instances JSON (any split, 2014 or 2017)."""
        if not Path(path).exists():
            raise VisinstructError(f"instances file not found: {path}", "pass a COCO root with annotations/instances_<split>.json")
        data = load_json(path, "COCO instances file", "use COCO's official instances_<split>.json")
        try:
            names = {c["id"]: c["name"] for c in data["categories"]}
            files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
            present: dict[int, set[str]] = {i: set() for i in files}
            for ann in data["annotations"]:
                present.setdefault(int(ann["image_id"]), set()).add(names[ann["category_id"]])
        except FileNotFoundError:
            raise VisinstructError(f"instances file not found: {path}", "pass a COCO root with annotations/instances_<split>.json") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise VisinstructError(f"{path} is not a COCO instances file ({type(exc).__name__}: {exc})",
                                   "use COCO's official instances_<split>.json") from None
        return cls({i: frozenset(c) for i, c in present.items()}, files)

    def frequency(self) -> Counter[str]:
        """Images containing each category (POPE's 'popular' ranking)."""
        return Counter(c for cats in self.categories_of.values() for c in cats)

    def co_occurrence(self) -> dict[str, Counter[str]]:
        """For each category, how many images it shares with every other category."""
        table: dict[str, Counter[str]] = {}
        for cats in self.categories_of.values():
            for a in cats:
                row = table.setdefault(a, Counter())
                row.update(b for b in cats if b != a)
        return table


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question with its ground truth."""

    question_id: str
    image_id: int
    file_name: str
    sampling: str
    category: str
    question: str
    label: str  # "yes" or "no"


def _ranked_absent(ranking: Counter[str], present: frozenset[str]) -> list[str]:
    """Absent categories by descending count, ties by name (so the order is a pure function of the data)."""
    return sorted((c for c in ranking if c not in present), key=lambda c: (-ranking[c], c))


def build_pope(objects: CocoObjects, sampling: str, per_image: int = 3, max_images: int | None = None,
               seed: int = 0, image_ids: Iterable[int] | None = None) -> list[PopeQuestion]:
    """Questions for images with at least `per_image` categories: per_image yes + per_image no each."""
    if sampling not in SAMPLINGS:
        raise VisinstructError(f"unknown POPE sampling {sampling!r}", f"use one of {', '.join(SAMPLINGS)}")
    allowed = set(image_ids) if image_ids is not None else None
    eligible = sorted(i for i, cats in objects.categories_of.items()
                      if len(cats) >= per_image and (allowed is None or i in allowed))
    # One image choice for all three samplings (as the paper): only the negatives differ between them.
    rng = random.Random(f"pope-images:{seed}")
    chosen = sorted(rng.sample(eligible, min(len(eligible), max_images))) if max_images is not None else eligible
    frequency = objects.frequency()
    all_categories = sorted(frequency)
    co_occurrence = objects.co_occurrence() if sampling == "adversarial" else {}
    questions: list[PopeQuestion] = []
    for image_id in chosen:
        present = objects.categories_of[image_id]
        image_rng = random.Random(f"pope:{seed}:{image_id}")
        positives = image_rng.sample(sorted(present), per_image)
        if sampling == "random":
            absent = [c for c in all_categories if c not in present]
            negatives = random.Random(f"pope-random:{seed}:{image_id}").sample(absent, min(per_image, len(absent)))
        elif sampling == "popular":
            negatives = _ranked_absent(frequency, present)[:per_image]
        else:
            together: Counter[str] = Counter()
            for category in present:
                together.update(co_occurrence.get(category, Counter()))
            negatives = _ranked_absent(together, present)[:per_image]
            if len(negatives) < per_image:  # too few co-occurring categories: fill with popular ones
                negatives += [c for c in _ranked_absent(frequency, present) if c not in negatives][:per_image - len(negatives)]
        if len(negatives) < per_image:
            continue  # an image holding nearly every category cannot be balanced
        pairs = [(c, "yes") for c in positives] + [(c, "no") for c in negatives]
        image_rng.shuffle(pairs)
        for k, (category, label) in enumerate(pairs):
            questions.append(PopeQuestion(f"{sampling}-{image_id}-{k}", image_id, objects.file_names[image_id],
                                          sampling, category, QUESTION_TEMPLATE.format(category), label))
    return questions


def parse_yes_no(answer: str) -> str:
    """POPE's rule: keep the first sentence; "no" if it holds a negative word (no, not, n't), else "yes"."""
    first = answer.strip().split(".")[0].lower().replace("n't", " not")
    words = re.findall(r"[a-z]+", first)
    return "no" if NEGATIVE_WORDS.intersection(words) else "yes"


@dataclass(frozen=True)
class PopeScore:
    """Confusion counts and the paper's five figures (yes = positive class)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def as_dict(self) -> dict[str, Any]:
        """Counts and figures; a figure whose denominator is zero is None."""
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else None
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if precision is not None and recall is not None else None)
        return {
            **asdict(self), "questions": self.total,
            "accuracy": (self.tp + self.tn) / self.total if self.total else None,
            "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (self.tp + self.fp) / self.total if self.total else None,
        }


def score_pope(labels: Iterable[str], predictions: Iterable[str]) -> PopeScore:
    """Confusion matrix of parsed predictions ("yes"/"no") against ground-truth labels."""
    counts = Counter(zip(labels, predictions, strict=True))
    return PopeScore(tp=counts[("yes", "yes")], fp=counts[("no", "yes")], tn=counts[("no", "no")], fn=counts[("yes", "no")])
