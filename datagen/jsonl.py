"""Append-only JSONL files that stay valid through crashes."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen.inputs import iter_jsonl_records
from datagen.outputs import LineAppender, write_error


def complete_size(path: Path) -> int:
    """Bytes up to and including the last newline: the part of an appended file that holds whole lines."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        pos, chunk = size, 65536
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            idx = fh.read(pos - start).rfind(b"\n")
            if idx >= 0:
                return start + idx + 1
            pos = start
    return 0


def repair_tail(path: Path) -> int:
    """Cut a half-written last line (from a killed run); return the bytes removed.

    Only for a file this run owns under its output lock (generate's own outputs); readers of other files use
    `complete_size` and leave them as they are.
    """
    if not path.exists():
        return 0
    size = path.stat().st_size
    keep = complete_size(path) if size else 0
    if keep < size:
        with open(path, "rb+") as fh:
            fh.truncate(keep)
    return size - keep


def iter_jsonl(path: Path, skip_partial_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file, through the input layer (a bad line is a user error naming file and line)."""
    for _, record in iter_jsonl_records(path, skip_partial_tail=skip_partial_tail):
        yield record


# json.dumps with any option builds an encoder per call; a line is encoded per sample, so one is kept.
_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False)


def json_line(record: dict[str, Any]) -> str:
    """One record as a line of the files this package writes (without the newline; non-ASCII kept as is)."""
    return _LINE_ENCODER.encode(record)


class JsonlWriter:
    """Appends complete JSON lines to a file this run owns (under its output lock), each batch all or nothing.

    A half-written tail from a killed run is cut on open; a failed write (a full disk) is cut back at once and
    raises `OutputWriteError`, so the file always ends in a complete line.
    """

    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self._out = LineAppender(self.path, fsync=fsync)  # checks the path and makes the folder first
        try:
            repair_tail(self.path)
        except OSError as exc:
            self._out.close()
            raise write_error(self.path, exc, resume=True) from None

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Append several records with one write (a crash may cut only the last line)."""
        self.write_lines([json_line(record) for record in records])

    def write_lines(self, lines: list[str]) -> None:
        """Append records already encoded by `json_line`, with one write."""
        if lines:
            self._out.append("\n".join(lines) + "\n")

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
