"""Reading and writing LLaVA-format sample files: JSONL or one JSON array, ours or anyone's."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen.coco import CocoIndex, ImageRecord
from datagen.errors import VisinstructError
from datagen.jsonl import iter_jsonl
from datagen.splits import SPLITS

SPLIT_NAMES = (*SPLITS, "captions")
LLAVA_HINT = 'each sample needs "conversations": [{"from": "human"|"gpt", "value": "..."}, ...]'


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        while True:
            chunk = fh.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def require_llava(rec: Any, where: str) -> dict[str, Any]:
    """The record if it has LLaVA's shape (a conversations list of from/value strings), else a user error."""
    if not isinstance(rec, dict):
        raise VisinstructError(f"{where} is not a JSON object", LLAVA_HINT)
    turns = rec.get("conversations")
    if turns is None and isinstance(rec.get("reject_reasons"), list):
        return rec  # a generation reject that never parsed (raw text only): kept for stats and review
    if not isinstance(turns, list):
        raise VisinstructError(f'{where} is not a LLaVA-format sample (no "conversations" list)', LLAVA_HINT)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise VisinstructError(f'{where}: turn {i} is not an object with string "from" and "value"', LLAVA_HINT)
    return rec


def read_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Samples of a JSONL file or a JSON array file, each shape-checked."""
    path = Path(path)
    if not path.is_file():
        raise VisinstructError(f"file not found: {path}", "pass an existing JSONL or JSON file of samples")
    try:
        first = _first_char(path)
    except UnicodeDecodeError:
        raise VisinstructError(f"{path} is not a UTF-8 text file", "pass a JSONL or JSON file of samples") from None
    if first == "[":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise VisinstructError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "fix the file") from None
        for i, rec in enumerate(data):
            yield require_llava(rec, f"{path} item {i}")
    elif first in ("{", ""):
        for lineno, rec in enumerate(iter_jsonl(path), 1):
            yield require_llava(rec, f"{path} record {lineno}")
    else:
        raise VisinstructError(f"{path} is neither JSONL nor a JSON array", "pass LLaVA-format samples as JSONL or a JSON list")


def split_from_filename(path: Path) -> str | None:
    """A split named by the file: conversation_58k.json -> conversation, complex_reasoning_77k -> reasoning."""
    name = Path(path).name.lower()
    for split in SPLIT_NAMES:
        if split in name or (split == "captions" and "caption" in name):
            return split
    return None


def sample_split(rec: dict[str, Any], fallback: str | None) -> str | None:
    """The record's own split field, else the fallback (a flag or the file name)."""
    value = rec.get("split")
    return value if isinstance(value, str) and value else fallback


class SampleWriter:
    """Writes samples to a new file: a JSON array if the name ends in .json, else JSONL."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.as_array = self.path.suffix == ".json"
        self._fh = open(self.path, "w", encoding="utf-8")
        self.count = 0
        if self.as_array:
            self._fh.write("[")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        if self.as_array:
            self._fh.write(("," if self.count else "") + "\n" + line)
        else:
            self._fh.write(line + "\n")
        self.count += 1

    def close(self) -> None:
        if self.as_array:
            self._fh.write("\n]\n")
        self._fh.close()

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
