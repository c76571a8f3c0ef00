"""Dataset statistics per split: sizes, lengths, question types, objects, CHAIR, reject reasons."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datagen.quality.io import ImageLookup
from datagen.sample import IMAGE_TOKEN, read_samples, sample_split, split_from_filename
from datagen.quality.objects import ChairCounter, ObjectMatcher, default_matcher, not_in_image

TOP_QUESTION_WORDS = 8
TOP_OBJECTS = 10


def _word_count(text: str) -> int:
    return len(text.replace(IMAGE_TOKEN, "").split())


def first_word(question: str) -> str:
    """The question type as its first word: "What color is ..." -> "what"."""
    words = re.findall(r"[A-Za-z']+", question.replace(IMAGE_TOKEN, ""))
    return words[0].lower() if words else "(none)"


def distribution(values: list[int]) -> dict[str, float]:
    """Mean, median and 95th percentile (zeros for no values)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    arr = np.asarray(values, dtype=float)
    return {"mean": round(float(arr.mean()), 2), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95))}


@dataclass
class SplitStats:
    """Accumulates the numbers of one split."""

    samples: int = 0
    turns: list[int] = field(default_factory=list)
    question_words: list[int] = field(default_factory=list)
    answer_words: list[int] = field(default_factory=list)
    question_types: Counter = field(default_factory=Counter)
    objects: Counter = field(default_factory=Counter)
    chair: ChairCounter = field(default_factory=ChairCounter)
    reject_reasons: Counter = field(default_factory=Counter)
    rejected: int = 0

    def as_dict(self, with_chair: bool) -> dict[str, Any]:
        questions = sum(self.question_types.values())
        return {
            "samples": self.samples,
            "rejected": self.rejected,
            "turns_per_sample": distribution(self.turns),
            "question_words": distribution(self.question_words),
            "answer_words": distribution(self.answer_words),
            "question_types": {
                word: round(count / questions, 3) for word, count in self.question_types.most_common(TOP_QUESTION_WORDS)
            },
            "objects_mentioned": sum(self.objects.values()),
            "top_objects": dict(self.objects.most_common(TOP_OBJECTS)),
            "chair_i": self.chair.chair_i if with_chair else None,
            "chair_s": self.chair.chair_s if with_chair else None,
            "reject_reasons": dict(sorted(self.reject_reasons.items())),
        }


def compute_stats(
    paths: list[Path], lookup: ImageLookup | None = None, split: str | None = None,
    matcher: ObjectMatcher | None = None, count_hedged: bool = False,
) -> dict[str, Any]:
    """Statistics per split (and "all") over the samples of the given files."""
    matcher = matcher or default_matcher()
    per_split: dict[str, SplitStats] = {}
    overall = SplitStats()
    for path in paths:
        fallback = split or split_from_filename(path)
        for rec in read_samples(path):
            name = split or sample_split(rec, fallback) or "unknown"
            targets = (per_split.setdefault(name, SplitStats()), overall)
            turns = rec.get("conversations", [])
            questions = [t["value"] for t in turns if t["from"] == "human"]
            answers = [t["value"] for t in turns if t["from"] == "gpt"]
            mentioned = matcher.categories("\n".join(answers), include_hedged=count_hedged)
            record = lookup.find(rec.get("image")) if lookup else None
            hallucinated: set[str] | None = None
            if record is not None:
                hallucinated = not_in_image(record, mentioned, matcher)
            reasons = rec.get("reject_reasons") if isinstance(rec.get("reject_reasons"), list) else []
            for stats in targets:
                stats.samples += 1
                if turns:  # unparsed rejects have no turns; they count only as rejected
                    stats.turns.append(len(turns))
                stats.question_words.extend(_word_count(q) for q in questions)
                stats.answer_words.extend(_word_count(a) for a in answers)
                stats.question_types.update(first_word(q) for q in questions)
                stats.objects.update(mentioned)
                if hallucinated is not None:
                    stats.chair.add(mentioned, hallucinated)
                if reasons:
                    stats.rejected += 1
                    stats.reject_reasons.update(str(r) for r in reasons)
    with_chair = lookup is not None
    result = {name: per_split[name].as_dict(with_chair) for name in sorted(per_split)}
    if len(per_split) > 1:
        result["all"] = overall.as_dict(with_chair)
    return result
