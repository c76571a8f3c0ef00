"""COCO records found by a sample's image path (the sample format itself lives in datagen.sample)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from datagen.coco import CocoIndex, ImageRecord


class ImageLookup:
    """COCO records found by a sample's image path (LLaVA uses the file name, maybe under a folder)."""

    def __init__(self, index: CocoIndex) -> None:
        self.index = index
        self.by_name = {Path(info["file_name"]).name: image_id for image_id, info in index.captions.imgs.items()}
        self._cache: dict[int, ImageRecord] = {}

    def find(self, image: Any) -> ImageRecord | None:
        """The record of the image, or None when the split does not have it."""
        if not isinstance(image, str) or not image:
            return None
        image_id = self.by_name.get(Path(image).name)
        if image_id is None or not self.index.captions.imgToAnns.get(image_id):
            return None
        if image_id not in self._cache:
            self._cache[image_id] = self.index.record(image_id)
        return self._cache[image_id]

    def path(self, record: ImageRecord) -> Path:
        return self.index.image_dir / record.file_name
