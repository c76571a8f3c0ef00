"""CHAIR (Rohrbach et al. 2018) on the model's own image descriptions.

The object matcher and synonym table are the quality gate's (datagen/quality/objects.py): one
implementation of "which COCO objects does this text name". The definition is CHAIR's standard one:
an object is hallucinated when the text names it and the image has it neither among its boxes nor in
its captions; CHAIR_i = hallucinated / mentioned objects, CHAIR_s = descriptions with one. A negated
mention ("no dog") names nothing; a hedged one ("might be a dog") counts, as in the original metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datagen.coco import ImageRecord
from datagen.quality.objects import ChairCounter, ObjectMatcher, default_matcher, ground_truth

DESCRIBE_PROMPT = "Describe this image in detail."


@dataclass(frozen=True)
class ChairItem:
    """One description and what CHAIR made of it."""

    image_id: int
    mentioned: frozenset[str]
    hallucinated: frozenset[str]


def chair_of(record: ImageRecord, description: str, matcher: ObjectMatcher | None = None) -> ChairItem:
    """Mentioned and hallucinated COCO categories of one description of one image."""
    matcher = matcher or default_matcher()
    mentioned = frozenset(matcher.categories(description, include_hedged=True))
    truth = ground_truth(record, matcher)
    return ChairItem(record.id, mentioned, frozenset(mentioned - truth))


def chair_scores(records: list[ImageRecord], descriptions: list[str]) -> tuple[dict[str, Any], list[ChairItem]]:
    """CHAIR_i / CHAIR_s over paired records and descriptions, and the per-image detail."""
    counter = ChairCounter()
    items = []
    for record, text in zip(records, descriptions, strict=True):
        item = chair_of(record, text)
        counter.add(set(item.mentioned), set(item.hallucinated))
        items.append(item)
    return counter.as_dict(), items
