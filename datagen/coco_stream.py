"""Stream the top-level arrays of a COCO annotation file one element at a time.

`json.load` of COCO train2017's 448 MB instances file holds every annotation (with its
segmentation polygons) as Python objects at once: about 3 GB. This reader walks the top-level
object itself and hands each element of each top-level array to a callback, parsed by the
standard library's C decoder from a bounded text buffer, so memory stays at one chunk plus one
element. It accepts and rejects exactly the documents `json.load` does.
"""
from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from typing import IO, Any

# Characters read per refill; elements longer than this grow the buffer as needed.
CHUNK_CHARS = 1 << 22
# A decode error this close to the buffer's end may only mean the element is cut by the chunk.
_TRUNCATION_SLACK = 16
_WHITESPACE = " \t\n\r"


class NotAnObjectError(ValueError):
    """The document is valid JSON so far but its top level is not an object."""


class ElementError(ValueError):
    """A handler's complaint about one element; `stream_top_level` fills in the line the element starts on."""

    line: int | None = None


class StreamDecodeError(ValueError):
    """The bytes are not UTF-8; `line` is the line of the first bad byte."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


class _Buffer:
    """A sliding window over a text or binary (UTF-8) stream, with absolute positions and lines for errors."""

    def __init__(self, stream: IO[Any], chunk_chars: int) -> None:
        self.stream = stream
        self.chunk_chars = chunk_chars
        self.text = ""
        self.pos = 0
        self.base = 0  # absolute offset of text[0] in the document
        self.lines_before = 0  # newlines in the document before text[0]
        self.eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")

    def fill(self) -> bool:
        """Drop what was consumed and read one more chunk; False at end of stream."""
        if self.eof:
            return False
        more = self._read()
        if not more:
            self.eof = True
            return False
        self.base += self.pos
        self.lines_before += self.text.count("\n", 0, self.pos)
        self.text = self.text[self.pos:] + more
        self.pos = 0
        return True

    def _read(self) -> str:
        raw = self.stream.read(self.chunk_chars)
        if isinstance(raw, str):
            return raw
        try:
            return self._decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            line = self.lines_before + self.text.count("\n") + raw.count(b"\n", 0, max(exc.start, 0)) + 1
            bad = raw[exc.start:exc.start + 1].hex() or "end of file"
            raise StreamDecodeError(f"not UTF-8 text (byte 0x{bad})", line) from None

    def line(self, absolute: int) -> int:
        """The 1-based line of an absolute offset that is still inside the window."""
        return self.lines_before + self.text.count("\n", 0, max(absolute - self.base, 0)) + 1

    def peek(self) -> str:
        """The next character that is not whitespace ('' at end of stream), not consumed."""
        while True:
            text, pos = self.text, self.pos
            while pos < len(text) and text[pos] in _WHITESPACE:
                pos += 1
            self.pos = pos
            if pos < len(text):
                return text[pos]
            if not self.fill():
                return ""

    def error(self, message: str) -> json.JSONDecodeError:
        return json.JSONDecodeError(message, self.text, self.pos)


_NUMBER_TAIL = frozenset("0123456789.eE+-")


def _may_continue(text: str, end: int) -> bool:
    """True when everything from `end` to the window's end could still belong to a number."""
    tail = text[end:end + 32]
    return len(tail) < 32 and all(c in _NUMBER_TAIL for c in tail) and end + len(tail) >= len(text)


class _Walker:
    """Parses values from a `_Buffer` with the stdlib decoder, refilling when a value is cut."""

    def __init__(self, buffer: _Buffer) -> None:
        self.buffer = buffer
        self.decoder = json.JSONDecoder()

    def value(self) -> Any:
        """Decode one JSON value at the current position (after whitespace)."""
        buf = self.buffer
        if not buf.peek():
            raise self._absolute(buf.error("Expecting value"))
        while True:
            try:
                obj, end = self.decoder.raw_decode(buf.text, buf.pos)
            except RecursionError:
                raise _PositionedError("JSON nested too deeply", buf.base + buf.pos, buf.line(buf.base + buf.pos)) from None
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(buf.text) - _TRUNCATION_SLACK or exc.msg.startswith("Unterminated string")
                if cut and buf.fill():
                    continue
                raise self._absolute(exc) from None
            # A number (or literal) reaching the window's end may continue in the next chunk:
            # "0" of "0.5", or "0." that the scanner reads as 0.
            if not buf.eof and _may_continue(buf.text, end) and buf.fill():
                continue
            buf.pos = end
            return obj

    def expect(self, allowed: str, what: str) -> str:
        """Consume one structural character among `allowed`, or fail like json.load does."""
        char = self.buffer.peek()
        if not char or char not in allowed:
            raise self._absolute(self.buffer.error(f"Expecting {what}"))
        self.buffer.pos += 1
        return char

    def _absolute(self, exc: json.JSONDecodeError) -> json.JSONDecodeError:
        """The error with its position counted from the start of the document, and its line."""
        where = self.buffer.base + exc.pos
        return _PositionedError(exc.msg, where, self.buffer.line(where))


class _PositionedError(json.JSONDecodeError):
    """A JSONDecodeError whose message carries the absolute character offset; lineno is the line."""

    def __init__(self, msg: str, where: int, line: int = 0) -> None:
        ValueError.__init__(self, f"{msg}: char {where}")
        self.msg, self.doc, self.pos, self.lineno, self.colno = msg, "", where, line, 0

    def __reduce__(self):
        return self.__class__, (self.msg, self.pos, self.lineno)


ElementHandler = Callable[[str, Any], None]
ArrayStart = Callable[[str, bool], None]


def stream_top_level(
    stream: IO[Any],
    on_array_start: ArrayStart,
    on_element: ElementHandler,
    chunk_chars: int = CHUNK_CHARS,
) -> None:
    """Walk `{key: value, ...}`: each array value is streamed through `on_element(key, item)`.

    `on_array_start(key, is_array)` is called whenever a key is met, so a repeated key can drop what
    an earlier occurrence delivered (json.load keeps the last one); a non-array value is reported
    with `is_array=False` and then delivered whole through `on_element(key, value)`. An ElementError
    from `on_element` leaves with the line its element starts on; a binary stream is decoded as UTF-8
    (StreamDecodeError names the line of a bad byte).
    """
    walker = _Walker(_Buffer(stream, chunk_chars))
    buf = walker.buffer
    first = buf.peek()
    if first != "{":
        walker.value()  # raises the decode error json.load would, or returns a non-object document
        if buf.peek():
            raise walker._absolute(buf.error("Extra data"))
        raise NotAnObjectError("the top level is not a JSON object")
    buf.pos += 1
    if buf.peek() == "}":
        buf.pos += 1
    else:
        while True:
            if buf.peek() != '"':
                raise walker._absolute(buf.error("Expecting property name enclosed in double quotes"))
            key = walker.value()
            walker.expect(":", "':' delimiter")
            if buf.peek() == "[":
                on_array_start(key, True)
                buf.pos += 1
                if buf.peek() == "]":
                    buf.pos += 1
                else:
                    while True:
                        before = buf.base + buf.pos
                        item = walker.value()
                        try:
                            on_element(key, item)
                        except ElementError as exc:
                            _locate(exc, buf, before)
                            raise
                        if walker.expect(",]", "',' delimiter") == "]":
                            break
            else:
                on_array_start(key, False)
                before = buf.base + buf.pos
                item = walker.value()
                try:
                    on_element(key, item)
                except ElementError as exc:
                    _locate(exc, buf, before)
                    raise
            if walker.expect(",}", "',' delimiter") == "}":
                break
    if buf.peek():
        raise walker._absolute(buf.error("Extra data"))


def _locate(exc: ElementError, buf: _Buffer, before: int) -> None:
    """Give a handler's error the line its element starts on (`before`: the offset ahead of its whitespace).

    The window still holds the element (a refill only drops what precedes it), so the line is counted
    from there; whitespace dropped before it was counted into `lines_before`.
    """
    if exc.line is not None:
        return
    index = max(before - buf.base, 0)
    text = buf.text
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    exc.line = buf.line(buf.base + index)
