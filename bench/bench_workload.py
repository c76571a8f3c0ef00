"""The benchmark's workload: N distinct conversation-split requests built from coco-mini records."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from datagen.coco import CocoIndex, ImageRecord

REPO = Path(__file__).resolve().parent.parent
COCO_MINI = REPO.parent / "shared" / "coco-mini"


def base_records(coco_root: Path = COCO_MINI) -> list[ImageRecord]:
    """Every captioned image of coco-mini (val2017 and train2017)."""
    records = []
    for split in ("val2017", "train2017"):
        index = CocoIndex(coco_root, split, with_instances=True)
        records += [index.record(i) for i in index.image_ids()]
    return records


def workload(count: int, coco_root: Path = COCO_MINI) -> Iterator[ImageRecord]:
    """`count` records with distinct ids and contexts (real captions and boxes, cycled with a round marker)."""
    base = base_records(coco_root)
    for n in range(count):
        record = base[n % len(base)]
        rnd = n // len(base)
        captions = list(record.captions)
        if rnd:
            captions[-1] = f"{captions[-1]} (take {rnd})"  # keeps every prompt, hence every cache key, distinct
        yield record.model_copy(update={"id": 10_000_000 + n, "captions": captions})
