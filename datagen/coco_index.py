"""A compact, memory-mappable index of one COCO split: what generation reads, nothing more.

Built once from the annotation files by streaming them (see `coco_stream`), written atomically
to one flat binary file, and reopened by path in any process (Ray workers included) through a
read-only memory map, so that processes on one node share its pages instead of each parsing
hundreds of megabytes of JSON.

File layout: 8-byte magic, little-endian u32 header length, a JSON header (sources, split, the
table of arrays: dtype, shape, offset), then the arrays, each aligned to 64 bytes.
"""
from __future__ import annotations

import array
import hashlib
import json
import math
import mmap
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datagen.coco_stream import ElementError, NotAnObjectError, stream_top_level

MAGIC = b"VICOCOIX"
# 2: sizes must be positive numbers and the files must have their lists (indexes of version 1 may hold width 0).
FORMAT_VERSION = 2
_ALIGN = 64
INDEX_SUFFIX = ".cocoidx"


class AnnotationFormatError(ElementError):
    """The file is JSON but not a COCO annotation file; the message names what is wrong (`line`: where, if known)."""


@dataclass(frozen=True)
class SourceStamp:
    """Identity of one annotation file as it was when an index was built from it."""

    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "SourceStamp":
        st = path.stat()
        return cls(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def default_index_dir() -> Path:
    """`$VISINSTRUCT_INDEX_DIR`, else `$XDG_CACHE_HOME/visinstruct/coco-index` (~/.cache by default)."""
    explicit = os.environ.get("VISINSTRUCT_INDEX_DIR")
    if explicit:
        return Path(explicit)
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "visinstruct" / "coco-index"


def index_file_name(captions: Path, instances: Path | None, split: str) -> str:
    """One file per (annotation paths, kind): a rebuild replaces the stale index instead of piling up."""
    kind = "full" if instances is not None else "captions"
    key = f"{captions.resolve()}\0{instances.resolve() if instances is not None else ''}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe_split = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)
    return f"{safe_split}-{kind}-{digest}{INDEX_SUFFIX}"


# --- building -------------------------------------------------------------------------------------

def _require(mapping: Any, key: str) -> Any:
    """mapping[key] the way pycocotools reads it: a missing key makes the file not COCO."""
    if not isinstance(mapping, dict):
        raise AnnotationFormatError(f"an entry is {type(mapping).__name__}, not an object")
    if key not in mapping:
        raise AnnotationFormatError(f"missing '{key}'")
    return mapping[key]


def _as_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise AnnotationFormatError(f"{what} {_shown(value)} is not an integer")
    return value


def _as_size(value: Any, what: str) -> int:
    """A width or height: a positive whole number (640 or 640.0); boxes are divided by it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 2**31 or value != int(value):
        raise AnnotationFormatError(f"{what} is {_shown(value)}, not a positive whole number")
    return int(value)


def _shown(value: Any) -> str:
    """A short rendering of a bad value for a message."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


class _StringColumn:
    """Variable-length UTF-8 strings as one byte blob plus offsets (no Python str per row kept)."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.ends = array.array("q")

    def append(self, text: str) -> None:
        # surrogatepass: JSON may carry lone surrogates (\ud800) that Python strings can hold.
        self.blob += text.encode("utf-8", "surrogatepass")
        self.ends.append(len(self.blob))

    def arrays(self, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [n+1], bytes) with rows permuted by `order` when given."""
        ends = np.frombuffer(self.ends, dtype=np.int64) if len(self.ends) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], ends]).astype(np.int64)
        if order is None:
            return offsets, np.frombuffer(bytes(self.blob), dtype=np.uint8)
        blob = bytes(self.blob)
        bounds = offsets.tolist()
        permuted = b"".join([blob[bounds[row]:bounds[row + 1]] for row in order.tolist()])
        lengths = np.diff(offsets)[order] if len(order) else np.zeros(0, np.int64)
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), np.frombuffer(permuted, dtype=np.uint8)


class _CaptionsReader:
    """Collects images and caption annotations of a captions file, in file order."""

    required = ("images", "annotations")

    def __init__(self) -> None:
        self.reset_images()
        self.reset_annotations()
        self.has_categories = False
        self.bad: dict[str, str] = {}
        self.seen: set[str] = set()

    def reset_images(self) -> None:
        self.image_ids = array.array("q")
        self.widths = array.array("q")
        self.heights = array.array("q")
        self.file_names = _StringColumn()

    def reset_annotations(self) -> None:
        self.caption_image_ids = array.array("q")
        self.captions = _StringColumn()
        self.category_checks: list[Any] = []  # annotations lacking category_id, checked if categories exist

    def start(self, key: str, is_array: bool) -> None:
        self.bad.pop(key, None)
        self.seen.add(key)
        if key == "images":
            self.reset_images()
        elif key == "annotations":
            self.reset_annotations()
        elif key == "categories":
            self.has_categories = True
        if not is_array and key in ("images", "annotations", "categories"):
            self.bad[key] = f"'{key}' is not a list"

    def element(self, key: str, item: Any) -> None:
        if key in self.bad:
            return
        if key == "images":
            image_id = _as_id(_require(item, "id"), "image id")
            self.image_ids.append(image_id)
            name = _require(item, "file_name")
            if not isinstance(name, str):
                raise AnnotationFormatError(f"file_name of image {image_id} is not a string")
            self.file_names.append(name)
            self.widths.append(_as_size(_require(item, "width"), f"width of image {image_id}"))
            self.heights.append(_as_size(_require(item, "height"), f"height of image {image_id}"))
        elif key == "annotations":
            image_id = _as_id(_require(item, "image_id"), "image_id")
            _require(item, "id")
            caption = _require(item, "caption")
            if not isinstance(caption, str):
                raise AnnotationFormatError(f"caption of annotation {_shown(item['id'])} is {_shown(caption)}, not a string")
            if "category_id" not in item:
                self.category_checks.append(item["id"])
            self.caption_image_ids.append(image_id)
            self.captions.append(caption.strip())
        elif key == "categories":
            _require(item, "id")

    def finish(self) -> None:
        _require_lists(self)
        if self.has_categories and self.category_checks:
            raise AnnotationFormatError("missing 'category_id'")


class _InstancesReader:
    """Collects instance annotations (image, id, category, box, crowd) and category names."""

    required = ("annotations", "categories")

    def __init__(self) -> None:
        self.reset_annotations()
        self.categories: dict[int, str] = {}
        self.has_categories = False
        self.bad: dict[str, str] = {}
        self.seen: set[str] = set()

    def reset_annotations(self) -> None:
        self.image_ids = array.array("q")
        self.ann_ids = array.array("q")
        self.category_ids = array.array("q")
        self.boxes = array.array("d")
        self.crowd = array.array("B")

    def start(self, key: str, is_array: bool) -> None:
        self.bad.pop(key, None)
        self.seen.add(key)
        if key == "annotations":
            self.reset_annotations()
        elif key == "categories":
            self.categories = {}
            self.has_categories = True
        if not is_array and key in ("images", "annotations", "categories"):
            self.bad[key] = f"'{key}' is not a list"

    def element(self, key: str, item: Any) -> None:
        if key in self.bad:
            return
        if key == "images":
            _require(item, "id")
        elif key == "annotations":
            self.image_ids.append(_as_id(_require(item, "image_id"), "image_id"))
            ann_id = _as_id(_require(item, "id"), "annotation id")
            self.ann_ids.append(ann_id)
            self.category_ids.append(_as_id(_require(item, "category_id"), f"category_id of annotation {ann_id}"))
            box = _require(item, "bbox")
            if not isinstance(box, list) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box
            ):
                raise AnnotationFormatError(f"bbox of annotation {ann_id} is {_shown(box)}, not four numbers")
            self.boxes.extend(float(v) for v in box)
            self.crowd.append(1 if item.get("iscrowd", 0) else 0)
        elif key == "categories":
            cat_id = _as_id(_require(item, "id"), "category id")
            name = _require(item, "name")
            if not isinstance(name, str):
                raise AnnotationFormatError(f"name of category {cat_id} is not a string")
            self.categories[cat_id] = name

    def finish(self) -> None:
        _require_lists(self)


def _require_lists(reader: _CaptionsReader | _InstancesReader) -> None:
    """The file's top-level lists are there and are lists (pycocotools would index an absent one as empty)."""
    if reader.bad:
        raise AnnotationFormatError(next(iter(reader.bad.values())))
    for key in reader.required:
        if key not in reader.seen:
            raise AnnotationFormatError(f"no '{key}' list at the top level")


def read_annotations(path: Path, reader: _CaptionsReader | _InstancesReader) -> None:
    """Stream one annotation file into `reader`; JSON errors propagate as json.JSONDecodeError (lineno set),
    bytes that are not UTF-8 as coco_stream.StreamDecodeError, format errors as AnnotationFormatError."""
    with open(path, "rb") as stream:
        try:
            stream_top_level(stream, reader.start, reader.element)
        except NotAnObjectError as exc:
            raise AnnotationFormatError(str(exc)) from None
    reader.finish()


def _last_wins(ids: np.ndarray) -> np.ndarray:
    """Positions of the last occurrence of each id (a dict keyed by id keeps the last), by id."""
    reversed_ids = ids[::-1]
    _, first_in_reversed = np.unique(reversed_ids, return_index=True)
    return (len(ids) - 1 - first_in_reversed).astype(np.int64)


def build_arrays(captions: _CaptionsReader, instances: _InstancesReader | None) -> dict[str, np.ndarray]:
    """The index's arrays: an image table sorted by id, captions and objects grouped per image."""
    listed_ids = np.frombuffer(captions.image_ids, dtype=np.int64) if len(captions.image_ids) else np.zeros(0, np.int64)
    keep = _last_wins(listed_ids)  # sorted by id
    info_ids = listed_ids[keep]
    cap_img = np.frombuffer(captions.caption_image_ids, dtype=np.int64) if len(captions.caption_image_ids) else np.zeros(0, np.int64)
    # Images with captions but no entry in `images` stay in the table so that asking for them
    # fails the way it always did ("has no captions"), and image_ids() still lists them.
    image_ids = np.union1d(info_ids, cap_img)
    n = len(image_ids)
    has_info = np.zeros(n, np.uint8)
    width = np.zeros(n, np.int64)
    height = np.zeros(n, np.int64)
    info_rows = np.searchsorted(image_ids, info_ids)
    has_info[info_rows] = 1
    if len(keep):
        width[info_rows] = np.frombuffer(captions.widths, dtype=np.int64)[keep]
        height[info_rows] = np.frombuffer(captions.heights, dtype=np.int64)[keep]
    # File names in table order; images without info get an empty name.
    name_order = np.full(n, -1, np.int64)
    name_order[info_rows] = keep
    src_bounds, src_blob = captions.file_names.ends.tolist(), bytes(captions.file_names.blob)
    name_column = _StringColumn()
    for row in name_order.tolist():
        if row >= 0:
            name_column.blob += src_blob[(src_bounds[row - 1] if row else 0):src_bounds[row]]
        name_column.ends.append(len(name_column.blob))
    name_offsets, name_bytes = name_column.arrays()

    cap_rows = np.searchsorted(image_ids, cap_img)
    cap_order = np.argsort(cap_rows, kind="stable")  # grouped by image, annotation order inside
    cap_offsets, cap_bytes = captions.captions.arrays(cap_order)
    cap_start = np.concatenate([[0], np.cumsum(np.bincount(cap_rows, minlength=n))]).astype(np.int64)

    out = {
        "image_id": image_ids.astype(np.int64), "has_info": has_info, "width": width, "height": height,
        "name_offsets": name_offsets, "name_bytes": name_bytes,
        "cap_start": cap_start, "cap_offsets": cap_offsets, "cap_bytes": cap_bytes,
    }
    if instances is not None:
        obj_img = np.frombuffer(instances.image_ids, dtype=np.int64) if len(instances.image_ids) else np.zeros(0, np.int64)
        rows = np.searchsorted(image_ids, obj_img)
        rows_clipped = np.minimum(rows, max(n - 1, 0))
        known = (rows < n) & (image_ids[rows_clipped] == obj_img) if n else np.zeros(len(obj_img), bool)
        selected = np.nonzero(known)[0]
        order = selected[np.argsort(rows[selected], kind="stable")]
        boxes = np.frombuffer(instances.boxes, dtype=np.float64).reshape(-1, 4) if len(instances.boxes) else np.zeros((0, 4))
        cat_ids = np.array(sorted(instances.categories), dtype=np.int64)
        cat_names = _StringColumn()
        for cat_id in cat_ids.tolist():
            cat_names.append(instances.categories[cat_id])
        cat_offsets, cat_bytes = cat_names.arrays()
        out.update({
            "obj_start": np.concatenate([[0], np.cumsum(np.bincount(rows[selected], minlength=n))]).astype(np.int64),
            "obj_ann_id": np.frombuffer(instances.ann_ids, dtype=np.int64)[order] if len(order) else np.zeros(0, np.int64),
            "obj_category_id": np.frombuffer(instances.category_ids, dtype=np.int64)[order] if len(order) else np.zeros(0, np.int64),
            "obj_bbox": np.ascontiguousarray(boxes[order]),
            "obj_crowd": np.frombuffer(instances.crowd, dtype=np.uint8)[order] if len(order) else np.zeros(0, np.uint8),
            "cat_id": cat_ids, "cat_name_offsets": cat_offsets, "cat_name_bytes": cat_bytes,
        })
    return out


# --- file format --------------------------------------------------------------------------------------

def write_index(target: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write header + aligned arrays to a temporary file beside `target`, then rename it into place."""
    table: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, arr in arrays.items():
        table[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"format": FORMAT_VERSION, **meta, "arrays": table}).encode()
    data_start = -(-(len(MAGIC) + 4 + len(header)) // _ALIGN) * _ALIGN
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared index from other users' workers
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC + len(header).to_bytes(4, "little") + header)
            out.write(b"\0" * (data_start - out.tell()))
            for name, arr in arrays.items():
                out.seek(data_start + table[name]["offset"])
                out.write(np.ascontiguousarray(arr).tobytes())
            out.truncate(data_start + offset)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class MappedIndex:
    """The arrays of one index file, memory-mapped read-only (pages shared between processes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.header, data_start = self._header(f, self.path)
            size = os.fstat(f.fileno()).st_size
            # The map outlives the file object: mmap keeps its own handle.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.arrays: dict[str, np.ndarray] = {}
        for name, spec in self.header["arrays"].items():
            dtype = np.dtype(spec["dtype"])
            count = int(np.prod(spec["shape"], dtype=np.int64))
            arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=data_start + spec["offset"]) if count else np.zeros(0, dtype)
            self.arrays[name] = arr.reshape(spec["shape"])

    @staticmethod
    def _header(f: Any, path: Path) -> tuple[dict[str, Any], int]:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a COCO index file")
        header_len = int.from_bytes(head[len(MAGIC):], "little")
        header = json.loads(f.read(header_len))
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} has another index format than {FORMAT_VERSION}")
        return header, -(-(len(MAGIC) + 4 + header_len) // _ALIGN) * _ALIGN

    @classmethod
    def read_header(cls, path: Path) -> dict[str, Any]:
        """The JSON header of an index file (sources, split, array table) without mapping it."""
        with open(path, "rb") as f:
            return cls._header(f, Path(path))[0]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def string(self, column: str, row: int) -> str:
        """Row `row` of a string column stored as `<column>_offsets` + `<column>_bytes`."""
        offsets = self.arrays[f"{column}_offsets"]
        start, end = int(offsets[row]), int(offsets[row + 1])
        return self.arrays[f"{column}_bytes"][start:end].tobytes().decode("utf-8", "surrogatepass")


def build_index_file(
    target: Path, captions_path: Path, instances_path: Path | None, meta: dict[str, Any],
    read: Callable[[Path, Any], None] = read_annotations,
) -> None:
    """Stream the annotation files and write the index at `target` (atomically)."""
    captions = _CaptionsReader()
    read(captions_path, captions)
    instances = None
    if instances_path is not None:
        instances = _InstancesReader()
        read(instances_path, instances)
    arrays = build_arrays(captions, instances)
    del captions, instances
    write_index(target, arrays, meta)
