"""The one input layer: every JSON, JSONL and text file a command reads goes through here.

Whatever is wrong with a file (it is missing, a folder, unreadable, not UTF-8, not JSON, nested
absurdly deep, holds NaN, or has the wrong shape) becomes one `InputError` that names the file and,
where there is one, the line: `<file>:<line>: <what>; <what to do>`. Callers never see
UnicodeDecodeError, JSONDecodeError, RecursionError or IsADirectoryError.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from datagen.errors import VisinstructError

# Deeper than any sample, manifest or COCO element; keeps every later walk over a value (pydantic,
# json.dumps, our own code) far below Python's recursion limit.
MAX_DEPTH = 64
FIX_LINE = "fix or remove that line"
_BOM = "\ufeff"


class InputError(VisinstructError):
    """A file that cannot be read as what it should be; the message starts with `<file>:<line>:`."""

    def __init__(self, path: Path | str, what: str, hint: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {what}", hint)
        self.path = Path(path)
        self.line = line


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are Python's extension, not JSON: a file holding them cannot be written back as JSON.
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    """True if a string in the value holds half of a UTF-16 pair (JSON can spell it; no file or terminal can hold it)."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def nesting_depth(text: str) -> int:
    """The deepest [ / { nesting of a JSON text (strings ignored)."""
    opened = text.count("[") + text.count("{")
    if opened <= MAX_DEPTH:
        return opened  # an upper bound, and small: no need to walk
    depth = peak = 0
    for char in re.sub(r"[^\[\]{}]", "", _STRING.sub("", text)):
        if char in "[{":
            depth += 1
            peak = max(peak, depth)
        else:
            depth -= 1
    return peak


def parse_json(text: str, path: Path | str, line: int | None = None, hint: str = FIX_LINE) -> Any:
    """One JSON value from text; any problem is an InputError naming the file and line."""
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        at = (line or 1) + exc.lineno - 1
        raise InputError(path, f"not valid JSON ({exc.msg} at column {exc.colno})", hint, at) from None
    except RecursionError:
        raise InputError(path, f"JSON nested deeper than {MAX_DEPTH} levels", hint, line) from None
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        raise InputError(path, f"not valid JSON ({exc})", hint, line) from None
    if nesting_depth(text) > MAX_DEPTH:
        raise InputError(path, f"JSON nested deeper than {MAX_DEPTH} levels", hint, line)
    # Pairs (\ud83d\ude00) decode to one character; a lone half would break every writer downstream.
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise InputError(path, "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text", hint, line)
    return value


def open_binary(path: Path | str, what: str = "input file") -> IO[bytes]:
    """The file opened for reading; a missing, folder or unreadable path is an InputError."""
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(path, f"{what} not found", "check the path") from None
    except IsADirectoryError:
        raise InputError(path, f"{what} is a folder, not a file", "pass a file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the {what} ({exc.strerror or exc})", "check its permissions") from None


def _decode(raw: bytes, path: Path, line: int, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"{what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                         "save it as UTF-8", line) from None


def iter_lines(path: Path | str, what: str = "input file") -> Iterator[tuple[int, str, bool]]:
    """(line number, text, ends with a newline) of each line, decoded strictly as UTF-8."""
    path = Path(path)
    with open_binary(path, what) as fh:
        try:
            for lineno, raw in enumerate(fh, 1):
                text = _decode(raw, path, lineno, what)
                if lineno == 1 and text.startswith(_BOM):
                    text = text[1:]
                yield lineno, text, raw.endswith(b"\n")
        except OSError as exc:
            raise InputError(path, f"cannot read the {what} ({exc.strerror or exc})", "check the file or disk") from None


def read_text(path: Path | str, what: str = "input file") -> str:
    """The whole file as text; missing, folder, unreadable or non-UTF-8 is an InputError naming the line."""
    path = Path(path)
    with open_binary(path, what) as fh:
        try:
            raw = fh.read()
        except OSError as exc:
            raise InputError(path, f"cannot read the {what} ({exc.strerror or exc})", "check the file or disk") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(path, f"{what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column})",
                         "save it as UTF-8", line) from None
    return text.removeprefix(_BOM)


def load_json(path: Path | str, what: str = "JSON file", hint: str = "fix the file") -> Any:
    """A whole JSON document through the same checks."""
    return parse_json(read_text(path, what), path, 1, hint)


def iter_jsonl_records(path: Path | str, what: str = "JSONL file", skip_partial_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; any bad line is an InputError naming it.

    skip_partial_tail: a last line without its newline that does not parse is ignored (a killed writer's
    half line), so a reader need not modify a file it only reads.
    """
    pending: tuple[int, str] | None = None
    for lineno, text, complete in iter_lines(path, what):
        if not text.strip():
            continue
        if skip_partial_tail and not complete:
            pending = (lineno, text)
            break
        yield lineno, _object(text, path, lineno)
    if pending is not None:
        try:
            record = _object(pending[1], path, pending[0])
        except InputError:
            return
        yield pending[0], record


def _object(text: str, path: Path | str, lineno: int) -> dict[str, Any]:
    value = parse_json(text, path, lineno)
    if not isinstance(value, dict):
        raise InputError(path, f"a JSON {json_type(value)}, not an object", "each line must be one JSON object", lineno)
    return value


def short_json(value: Any, limit: int = 40) -> str:
    """A bad value as JSON, cut to `limit` characters, for a message."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = json_type(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def first_char(path: Path | str, what: str = "input file") -> str:
    """The first character that is not whitespace ('' for an empty file), to tell JSON from JSONL.

    Only the start is looked at; the reader that follows decodes (and checks) every byte.
    """
    with open_binary(path, what) as fh:
        head = b""
        while True:
            try:
                chunk = fh.read(4096)
            except OSError as exc:
                raise InputError(path, f"cannot read the {what} ({exc.strerror or exc})", "check the file or disk") from None
            if not chunk:
                return ""
            head = (head + chunk).removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
            if head:
                return chr(head[0]) if head[0] < 0x80 else "\ufffd"


def load_yaml(path: Path | str, what: str = "YAML file", hint: str = "fix the file") -> Any:
    """A YAML (or JSON, which YAML reads) document through the same checks; a .json file is read as JSON."""
    text = read_text(path, what)
    if Path(path).suffix == ".json":
        return parse_json(text, path, 1, hint)
    try:
        value = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        raise InputError(path, f"not valid YAML ({exc.problem or exc})", hint, line) from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({exc})", hint) from None
    except RecursionError:
        raise InputError(path, f"YAML nested deeper than Python can read", hint) from None
    if nesting_depth(text) > MAX_DEPTH:
        raise InputError(path, f"nested deeper than {MAX_DEPTH} levels", hint)
    return value
