"""Append-only JSONL files that stay valid through crashes."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen.inputs import iter_jsonl_records


def repair_tail(path: Path) -> int:
    """Cut a half-written last line (from a killed run); return the bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # Walk back to the last newline; everything after it is an incomplete record.
        pos, chunk = size, 65536
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            data = fh.read(pos - start)
            idx = data.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                fh.truncate(keep)
                return size - keep
            pos = start
        fh.truncate(0)
        return size


def iter_jsonl(path: Path, skip_partial_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file, through the input layer (a bad line is a user error naming file and line)."""
    for _, record in iter_jsonl_records(path, skip_partial_tail=skip_partial_tail):
        yield record


class JsonlWriter:
    """Appends one complete JSON line per record, flushed as it is written."""

    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._fsync = fsync

    def write(self, record: dict[str, Any]) -> None:
        # One write call per line: a crash leaves at most one partial line, which repair_tail cuts.
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Append several records with one write and one flush (a crash may cut only the last line)."""
        if not records:
            return
        self._fh.write("".join([json.dumps(record, ensure_ascii=False) + "\n" for record in records]))
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
