"""What the checks read and share: the view of one sample, and the state of a checking run.

Its own module so that check modules (counting, grounding, negation) can name these types without
importing the check registry that imports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from datagen.coco import ImageRecord
from datagen.quality.config import QualityConfig
from datagen.quality.minhash import NearDuplicateIndex
from datagen.quality.objects import ObjectMatcher, ground_truth, not_in_image
from datagen.sample import IMAGE_TOKEN, Sample


@dataclass
class SampleView:
    """What the checks read: the turns, the split, and what is known about the image and the completion."""

    key: str
    turns: list[tuple[str, str]]
    split: str | None = None
    has_image: bool = True
    finish_reason: str | None = None
    record: ImageRecord | None = None
    # Negative samples: the absent objects the writer was given (meta.absent_objects).
    absent_objects: list[str] = field(default_factory=list)
    # The sample's "image" value as stored (None when it has none), for the path rule.
    image: object = None

    # Read by most checks, so made once per view (a view's turns are not changed once it is made; do not change
    # the lists either).
    @cached_property
    def questions(self) -> list[str]:
        return [_strip_image(v) for s, v in self.turns if s == "human"]

    @cached_property
    def answers(self) -> list[str]:
        return [v.strip() for s, v in self.turns if s == "gpt"]

    @classmethod
    def from_record(
        cls, rec: dict[str, Any], split: str | None = None, finish_reason: str | None = None,
        record: ImageRecord | None = None,
    ) -> "SampleView":
        """A view of one LLaVA-format dict (already shape-checked by datagen.sample.read_samples)."""
        meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
        return cls(
            key=str(rec.get("id", "")),
            turns=[(str(t.get("from")), str(t.get("value"))) for t in rec.get("conversations", [])],
            split=split or rec.get("split"),
            has_image=bool(rec.get("image")),
            finish_reason=finish_reason or meta.get("finish_reason"),
            record=record,
            absent_objects=_absent_list(meta),
            image=rec.get("image"),
        )


    @classmethod
    def from_sample(
        cls, sample: Sample, split: str | None = None, finish_reason: str | None = None,
        record: ImageRecord | None = None,
    ) -> "SampleView":
        """The same view as `from_record(sample.to_record(), ...)`, without dumping the model first."""
        meta = sample.meta if isinstance(sample.meta, dict) else {}
        return cls(
            key=str(sample.id),
            turns=[(str(t.speaker), str(t.value)) for t in sample.conversations],
            split=split or sample.split,
            has_image=bool(sample.image),
            finish_reason=finish_reason or meta.get("finish_reason"),
            record=record,
            absent_objects=_absent_list(meta),
            image=sample.image,
        )


@dataclass
class CheckEnv:
    """Shared state of one checking run: thresholds, the object matcher, seen texts, cached truths."""

    config: QualityConfig
    matcher: ObjectMatcher
    near_duplicates: NearDuplicateIndex
    truths: dict[int, set[str]] = field(default_factory=dict)
    # The last (answers text, include_hedged) -> categories: one sample's checks ask for it twice.
    last_mentioned: tuple[str, bool, frozenset[str]] | None = None
    # Results one check computes and another reuses for the same sample (cleared before each sample).
    memo: dict[tuple, Any] = field(default_factory=dict)

    TRUTH_CACHE_SIZE = 4096  # records whose truth is kept (best-of-N and re-judging ask again); then it starts over

    def truth(self, record: ImageRecord) -> set[str]:
        """The categories the image is known to contain (datagen.quality.objects.ground_truth), remembered."""
        truths = self.truths
        found = truths.get(record.id)
        if found is None:
            if len(truths) >= self.TRUTH_CACHE_SIZE:
                truths.clear()  # bounded: a run over a whole COCO split would otherwise keep one set per image
            found = truths[record.id] = ground_truth(record, self.matcher)
        return found

    def unknown(self, record: ImageRecord, categories: set[str]) -> set[str]:
        """Those of `categories` the image is not known to contain (neither boxed nor named by a caption):
        `objects.not_in_image`, with the truth remembered here."""
        return not_in_image(record, categories, self.matcher, lambda: self.truth(record))

    def mentioned(self, text: str, include_hedged: bool) -> set[str]:
        """Categories the text names (the matcher's answer, remembered for the same text)."""
        last = self.last_mentioned
        if last is not None and last[0] == text and last[1] == include_hedged:
            return set(last[2])
        found = self.matcher.categories(text, include_hedged=include_hedged)
        self.last_mentioned = (text, include_hedged, frozenset(found))
        return found


def _absent_list(meta: dict[str, Any]) -> list[str]:
    value = meta.get("absent_objects")
    return [str(v) for v in value] if isinstance(value, list) else []


def _strip_image(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()
