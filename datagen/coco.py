"""COCO annotations (captions + instances) to typed per-image records."""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel

from datagen.errors import VisinstructError


class ObjectBox(BaseModel):
    """One COCO instance: category name, pixel box [x, y, w, h], crowd flag."""

    category: str
    bbox: tuple[float, float, float, float]
    iscrowd: bool = False


class ImageRecord(BaseModel):
    """Everything the generator knows about one image."""

    id: int
    file_name: str
    width: int
    height: int
    captions: list[str]
    objects: list[ObjectBox] = []


def annotation_path(root: Path, kind: str, split: str) -> Path:
    """Official location of an annotation file, e.g. annotations/captions_val2017.json."""
    return Path(root) / "annotations" / f"{kind}_{split}.json"


def _load_coco(path: Path):
    from pycocotools.coco import COCO

    if not path.is_file():
        raise VisinstructError(
            f"COCO annotation file not found: {path}",
            "point --coco-root at a folder with annotations/ (official layout) or run `datagen coco fetch`",
        )
    try:
        # pycocotools prints progress to stdout; keep stdout clean for `datagen render`.
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VisinstructError(f"malformed COCO JSON in {path}: {exc}", "re-download the annotation file") from None
    except (KeyError, TypeError, AssertionError) as exc:
        raise VisinstructError(
            f"{path} is not a COCO annotation file (missing {exc})", "check that the file is COCO's official format"
        ) from None


class CocoIndex:
    """Captions and instance boxes of one split, loaded once, read per image."""

    def __init__(self, root: str | Path, split: str, with_instances: bool = True) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise VisinstructError(
                f"COCO root not found: {self.root}", "pass --coco-root DIR or fetch data with `datagen coco fetch`"
            )
        self.captions = _load_coco(annotation_path(self.root, "captions", split))
        inst_path = annotation_path(self.root, "instances", split)
        self.instances = _load_coco(inst_path) if with_instances else None
        self.categories: dict[int, str] = {}
        if self.instances is not None:
            self.categories = {c["id"]: c["name"] for c in self.instances.dataset.get("categories", [])}

    @property
    def image_dir(self) -> Path:
        return self.root / self.split

    def image_ids(self) -> list[int]:
        """Ids of the images that have captions, ascending (a stable order for limits and shards)."""
        return sorted(i for i, anns in self.captions.imgToAnns.items() if anns)

    def record(self, image_id: int) -> ImageRecord:
        """The typed record of one image; an unknown id is a user error."""
        info = self.captions.imgs.get(image_id)
        if info is None or not self.captions.imgToAnns.get(image_id):
            raise VisinstructError(
                f"image id {image_id} has no captions in {annotation_path(self.root, 'captions', self.split)}",
                "check --image-id/--image-ids and --coco-split",
            )
        captions = [a["caption"].strip() for a in self.captions.imgToAnns[image_id]]
        objects: list[ObjectBox] = []
        if self.instances is not None:
            for ann in self.instances.imgToAnns.get(image_id, []):
                name = self.categories.get(ann["category_id"])
                if name is None:
                    raise VisinstructError(
                        f"annotation {ann.get('id')} names unknown category {ann['category_id']}",
                        "check the instances file's categories list",
                    )
                objects.append(ObjectBox(category=name, bbox=tuple(ann["bbox"]), iscrowd=bool(ann.get("iscrowd", 0))))
        return ImageRecord(
            id=image_id,
            file_name=info["file_name"],
            width=int(info["width"]),
            height=int(info["height"]),
            captions=captions,
            objects=objects,
        )

    def records(self, image_ids: Iterable[int] | None = None, limit: int | None = None) -> Iterator[ImageRecord]:
        """Yield records for the given ids (or all captioned images), at most `limit` of them."""
        ids = list(image_ids) if image_ids is not None else self.image_ids()
        if limit is not None:
            ids = ids[:limit]
        for image_id in ids:
            yield self.record(image_id)
