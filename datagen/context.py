"""LLaVA's symbolic image context: captions, then normalised object boxes."""
from __future__ import annotations

from datagen.coco import ImageRecord, ObjectBox


def normalised_box(obj: ObjectBox, width: int, height: int) -> list[float]:
    """COCO [x, y, w, h] pixels to [x1, y1, x2, y2] in [0, 1], rounded to 3 decimals."""
    x, y, w, h = obj.bbox
    return [round(x / width, 3), round(y / height, 3), round((x + w) / width, 3), round((y + h) / height, 3)]


def render_context(record: ImageRecord, with_boxes: bool) -> str:
    """Captions one per line; with boxes, a blank line and `category: [x1, y1, x2, y2]` lines."""
    text = "\n".join(record.captions)
    if with_boxes and record.objects:
        # str() of a float list prints floats the way LLaVA's files show them (0.23, 1.0).
        boxes = "\n".join(f"{o.category}: {normalised_box(o, record.width, record.height)}" for o in record.objects)
        text = f"{text}\n\n{boxes}"
    return text
