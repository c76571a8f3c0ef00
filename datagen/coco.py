"""COCO annotations (captions + instances) to typed per-image records, through a cached index.

The first use of a split streams its annotation files into a compact index file (see
`datagen.coco_index`); later runs, and worker processes given the index's path, memory-map it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsIndex

import numpy as np
from pydantic import BaseModel

from datagen.coco_index import (
    AnnotationFormatError,
    MappedIndex,
    SourceStamp,
    _InstancesReader,
    build_index_file,
    default_index_dir,
    index_file_name,
    read_annotations,
)
from datagen.coco_stream import StreamDecodeError
from datagen.errors import VisinstructError
from datagen.inputs import InputError


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

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        """Pickled as its fields with the boxes as plain tuples, rebuilt in one pydantic-core validation.

        Records travel to judge processes and Ray workers with every request; pydantic's own pickling stores each
        box's state dict and restores it in Python, which made unpickling a record (8.5 boxes on average in
        coco-mini) cost more than checking one of its answers. Subclasses keep pydantic's pickling.
        """
        if type(self) is not ImageRecord:
            return super().__reduce_ex__(protocol)
        boxes = [(box.category, box.bbox, box.iscrowd) for box in self.objects]
        return record_from_fields, (self.id, self.file_name, self.width, self.height, self.captions, boxes)


def record_from_fields(image_id: int, file_name: str, width: int, height: int, captions: list[str],
                       boxes: Iterable[tuple[str, Any, bool]]) -> ImageRecord:
    """An ImageRecord from plain fields, boxes as (category, [x, y, w, h], crowd), validated in one pydantic-core call
    (the index reads records this way, and `ImageRecord.__reduce_ex__` rebuilds them so)."""
    return ImageRecord.model_validate({
        "id": image_id, "file_name": file_name, "width": width, "height": height, "captions": captions,
        "objects": [{"category": category, "bbox": bbox, "iscrowd": crowd} for category, bbox, crowd in boxes],
    })


def annotation_path(root: Path, kind: str, split: str) -> Path:
    """Official location of an annotation file, e.g. annotations/captions_val2017.json."""
    return Path(root) / "annotations" / f"{kind}_{split}.json"


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise VisinstructError(
            f"COCO annotation file not found: {path}",
            "point --coco-root at a folder with annotations/ (official layout) or run `datagen coco fetch`",
        )
    return path


def _read_or_explain(path: Path, reader: Any) -> None:
    """Stream one annotation file; decoding and format problems become one-line user errors naming the line."""
    try:
        read_annotations(path, reader)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"malformed COCO JSON ({exc.msg})", "re-download the annotation file", exc.lineno or None) from None
    except StreamDecodeError as exc:
        raise InputError(path, f"malformed COCO JSON: {exc}", "re-download the annotation file", exc.line) from None
    except AnnotationFormatError as exc:
        raise InputError(path, f"not a COCO annotation file: {exc}", "check that the file is COCO's official format",
                         exc.line) from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, not a COCO annotation file", "point --coco-root at COCO's layout") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the annotation file ({exc.strerror or exc})", "check its permissions") from None


def read_instance_categories(path: Path) -> tuple[list[str], list[set[str]]]:
    """The category names of a COCO instances file and, per image with boxes, its boxed category names.

    Streamed and checked like the files an index is built from (errors name the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "COCO instances file not found", "pass an instances JSON file, e.g. instances_train2017.json")
    reader = _InstancesReader()
    _read_or_explain(path, reader)
    per_image: dict[int, set[str]] = {}
    for image_id, category_id in zip(reader.image_ids.tolist(), reader.category_ids.tolist()):
        name = reader.categories.get(category_id)
        if name is None:
            raise InputError(path, f"an annotation of image {image_id} names unknown category {category_id}",
                             "check the file's categories list")
        per_image.setdefault(image_id, set()).add(name)
    return list(reader.categories.values()), list(per_image.values())


def _fresh(index_path: Path, sources: list[SourceStamp]) -> bool:
    """True when the index file exists, is readable, and was built from exactly these files."""
    try:
        header = MappedIndex.read_header(index_path)
    except (OSError, ValueError):
        return False
    return header.get("sources") == [vars(s) for s in sources]


@dataclass(frozen=True)
class IndexPlan:
    """Where a split's index is, what it is built from, and whether the file there is up to date."""

    path: Path
    captions: Path
    instances: Path | None
    sources: list[SourceStamp]
    fresh: bool
    meta: dict[str, Any]


def plan_index(root: str | Path, split: str, with_instances: bool = True, index_dir: Path | None = None) -> IndexPlan:
    """The index a reader of the split needs: a fresh full index if there is one (it also serves captions-only
    readers), else the one to build (full, or captions-only when `with_instances` is False)."""
    root = Path(root)
    captions_path = _require_file(annotation_path(root, "captions", split))
    instances_path = annotation_path(root, "instances", split)
    if with_instances:
        _require_file(instances_path)
    folder = index_dir if index_dir is not None else default_index_dir()
    captions_stamp = SourceStamp.of(captions_path)
    full_path = folder / index_file_name(captions_path, instances_path, split)
    full_sources: list[SourceStamp] = []
    if instances_path.is_file():
        full_sources = [captions_stamp, SourceStamp.of(instances_path)]
        if _fresh(full_path, full_sources):
            return IndexPlan(full_path, captions_path, instances_path, full_sources, True, {})
    if with_instances:
        target, sources, instances = full_path, full_sources, instances_path
        fresh = False
    else:
        target, sources, instances = folder / index_file_name(captions_path, None, split), [captions_stamp], None
        fresh = _fresh(target, sources)
    meta = {"root": str(root), "split": split, "with_instances": with_instances, "sources": [vars(s) for s in sources]}
    return IndexPlan(target, captions_path, instances, sources, fresh, meta)


def build_planned_index(plan: IndexPlan) -> Path:
    """Build the index `plan` names (streamed, written atomically); user errors for bad files or folders."""
    try:
        build_index_file(plan.path, plan.captions, plan.instances, plan.meta, read=_read_or_explain)
    except OSError as exc:
        raise VisinstructError(
            f"cannot write the COCO index to {plan.path.parent}: {exc.strerror or exc}",
            "set VISINSTRUCT_INDEX_DIR to a writable folder",
        ) from None
    return plan.path


def ensure_index(
    root: str | Path, split: str, with_instances: bool = True, index_dir: Path | None = None
) -> Path:
    """Path of an up-to-date index of the split, building it (once, atomically) when absent or stale."""
    plan = plan_index(root, split, with_instances, index_dir)
    return plan.path if plan.fresh else build_planned_index(plan)


def open_index(index_path: str | Path) -> "CocoIndex":
    """Open a built index by path without reading any JSON (what a worker process calls)."""
    return CocoIndex.from_index_file(Path(index_path))


def normalised_box(obj: ObjectBox, width: int, height: int) -> list[float]:
    """COCO [x, y, w, h] pixels to [x1, y1, x2, y2] in [0, 1], rounded to 3 decimals."""
    x, y, w, h = obj.bbox
    return [round(x / width, 3), round(y / height, 3), round((x + w) / width, 3), round((y + h) / height, 3)]


class _ImagesView(Mapping):
    """pycocotools' `imgs` (id -> image info) for the images listed in the captions file."""

    def __init__(self, index: "CocoIndex") -> None:
        self._index = index

    def __getitem__(self, image_id: int) -> dict[str, Any]:
        row = self._index._row(image_id)
        if row is None or not self._index._store["has_info"][row]:
            raise KeyError(image_id)
        return self._index._info(row)

    def __iter__(self) -> Iterator[int]:
        store = self._index._store
        return iter(store["image_id"][store["has_info"].astype(bool)].tolist())

    def __len__(self) -> int:
        return int(self._index._store["has_info"].sum())


class _CaptionAnnotationsView(Mapping):
    """pycocotools' `imgToAnns` of the captions file (id -> its caption annotations, stripped)."""

    def __init__(self, index: "CocoIndex") -> None:
        self._index = index

    def __getitem__(self, image_id: int) -> list[dict[str, Any]]:
        row = self._index._row(image_id)
        captions = [] if row is None else self._index._captions(row)
        if not captions:
            raise KeyError(image_id)
        return [{"image_id": image_id, "caption": c} for c in captions]

    def __iter__(self) -> Iterator[int]:
        return iter(self._index.image_ids())

    def __len__(self) -> int:
        return len(self._index.image_ids())


class CaptionsView:
    """The two pycocotools tables that callers read (`imgs`, `imgToAnns`), served from the index."""

    def __init__(self, index: "CocoIndex") -> None:
        self.imgs = _ImagesView(index)
        self.imgToAnns = _CaptionAnnotationsView(index)


class CocoIndex:
    """Captions and instance boxes of one split, read per image from a memory-mapped index."""

    def __init__(
        self, root: str | Path, split: str, with_instances: bool = True, index_dir: Path | None = None
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise VisinstructError(
                f"COCO root not found: {root}", "pass --coco-root DIR or fetch data with `datagen coco fetch`"
            )
        self._open(ensure_index(root, split, with_instances, index_dir), root, split, with_instances)

    @classmethod
    def from_index_file(cls, index_path: Path) -> "CocoIndex":
        """An index opened from its file alone; root and split come from the file's header."""
        self = cls.__new__(cls)
        try:
            header = MappedIndex.read_header(index_path)
        except (OSError, ValueError) as exc:
            raise VisinstructError(f"cannot open COCO index {index_path}: {exc}", "rebuild it by running the command on the driver") from None
        self._open(Path(index_path), Path(header["root"]), header["split"], header["with_instances"])
        return self

    def _open(self, index_path: Path, root: Path, split: str, with_instances: bool) -> None:
        self.root = root
        self.split = split
        self.index_path = index_path
        self._store = MappedIndex(index_path)
        # A full index may serve a captions-only reader: then it shows no objects, like before.
        self.with_instances = with_instances and "obj_start" in self._store
        self.categories: dict[int, str] = {}
        if self.with_instances:
            self.categories = {
                int(cat_id): self._store.string("cat_name", row) for row, cat_id in enumerate(self._store["cat_id"].tolist())
            }
        self.captions = CaptionsView(self)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Pickled by path (e.g. shipped to Ray workers): the receiver maps the same file.
        return open_index, (str(self.index_path),)

    @property
    def image_dir(self) -> Path:
        return self.root / self.split

    def image_ids(self) -> list[int]:
        """Ids of the images that have captions, ascending (a stable order for limits and shards)."""
        cap_start = self._store["cap_start"]
        return self._store["image_id"][cap_start[1:] > cap_start[:-1]].tolist()

    def _row(self, image_id: Any) -> int | None:
        ids = self._store["image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            return None
        if not -(2**63) <= int(image_id) < 2**63 or not len(ids):
            return None
        row = int(np.searchsorted(ids, image_id))
        return row if row < len(ids) and int(ids[row]) == int(image_id) else None

    def _info(self, row: int) -> dict[str, Any]:
        store = self._store
        return {
            "id": int(store["image_id"][row]), "file_name": store.string("name", row),
            "width": int(store["width"][row]), "height": int(store["height"][row]),
        }

    def _captions(self, row: int) -> list[str]:
        start, end = self._store["cap_start"][row:row + 2].tolist()
        return [self._store.string("cap", i) for i in range(start, end)]

    def record(self, image_id: int) -> ImageRecord:
        """The typed record of one image; an unknown id is a user error."""
        row = self._row(image_id)
        captions = self._captions(row) if row is not None else []
        if row is None or not self._store["has_info"][row] or not captions:
            raise VisinstructError(
                f"image id {image_id} has no captions in {annotation_path(self.root, 'captions', self.split)}",
                "check --image-id/--image-ids and --coco-split",
            )
        objects: list[tuple[str, list[float], bool]] = []
        if self.with_instances:
            store = self._store
            start, end = store["obj_start"][row:row + 2].tolist()
            category_ids = store["obj_category_id"][start:end].tolist()
            boxes = store["obj_bbox"][start:end].tolist()
            crowd = store["obj_crowd"][start:end].tolist()
            for offset, (category_id, box, is_crowd) in enumerate(zip(category_ids, boxes, crowd)):
                name = self.categories.get(category_id)
                if name is None:
                    raise VisinstructError(
                        f"annotation {int(store['obj_ann_id'][start + offset])} names unknown category {category_id}",
                        "check the instances file's categories list",
                    )
                objects.append((name, box, bool(is_crowd)))
        info = self._info(row)
        return record_from_fields(image_id, info["file_name"], info["width"], info["height"], captions, objects)

    def category_sets(self) -> Iterator[set[str]]:
        """The set of boxed category names of each image with boxes (what co-occurrence is counted over)."""
        if not self.with_instances:
            return
        store = self._store
        obj_start = store["obj_start"].tolist()
        category_ids = store["obj_category_id"]
        for row in range(len(obj_start) - 1):
            start, end = obj_start[row], obj_start[row + 1]
            if end > start:
                yield {self.categories[c] for c in set(category_ids[start:end].tolist()) if c in self.categories}

    def records(self, image_ids: Iterable[int] | None = None, limit: int | None = None) -> Iterator[ImageRecord]:
        """Yield records for the given ids (or all captioned images), at most `limit` of them."""
        ids = list(image_ids) if image_ids is not None else self.image_ids()
        if limit is not None:
            ids = ids[:limit]
        for image_id in ids:
            yield self.record(image_id)
