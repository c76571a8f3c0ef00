"""Untrusted text (sample text, ids, captions, file names) made safe for the medium it lands in.

One rule per medium, here and nowhere else:
- HTML: `html_text` for text and attribute values written into markup, `script_json` for data
  embedded in a `<script type="application/json">` element;
- terminal: `terminal_text` makes control characters visible (for plain prints, error lines and rich
  `Text` objects); `echo` is the CLI's one way to print a line, through it; `terminal_markup` also escapes
  rich markup (for strings rich parses as markup: panel and table titles, table cells, `console.print("...")`).
Image paths have their own rule, beside the sample format: `datagen.sample.resolve_image`.
"""
from __future__ import annotations

import json
import re
from typing import Any

import typer
from rich.markup import escape as _rich_escape

# --- HTML -----------------------------------------------------------------------------------------

_HTML_TEXT = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_HTML_TEXT_RE = re.compile("[&<>\"']")
# Inside a script element the HTML tokenizer looks for `</script`, and `<!--` followed by `<script`
# switches it to a state where `</script>` no longer ends the element; JavaScript once treated
# U+2028/U+2029 as line ends. A lone surrogate cannot be written as UTF-8 at all. JSON lets each of
# these be written as a \u escape, after which none of `<`, `>`, `&` is left in the payload.
_SCRIPT_UNSAFE_RE = re.compile("[<>&\u2028\u2029\ud800-\udfff]")


def html_text(value: object) -> str:
    """Text for an HTML element's content or a quoted attribute value: & < > " ' as character references.

    A lone surrogate (possible in a JSON string) becomes U+FFFD, as a browser would show it.
    """
    text = _SURROGATE_RE.sub("\ufffd", str(value))
    return _HTML_TEXT_RE.sub(lambda m: _HTML_TEXT[m.group()], text)


def script_json(data: Any) -> str:
    """JSON to embed in `<script type="application/json">`: no text in it can end or reopen an element.

    `JSON.parse(element.textContent)` gives back exactly `data` (lone surrogates included).
    """
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return _SCRIPT_UNSAFE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", payload)


# --- terminal -------------------------------------------------------------------------------------

# C0 controls (ESC starts CSI/OSC sequences, BEL ends OSC, CR overwrites the line, BS erases), DEL,
# C1 controls (0x9b is a one-byte CSI, 0x9d a one-byte OSC on some terminals), the bidirectional
# overrides and isolates that reorder what is shown (U+202E: "Trojan source"), the line and paragraph
# separators, and lone surrogates (printing one raises UnicodeEncodeError). Letters of any script,
# emoji (with their zero-width joiners) and combining marks stay as they are.
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_OTHER_UNSAFE = f"\x7f-\x9f{_BIDI}\u2028\u2029\ud800-\udfff"
_TERMINAL_UNSAFE_RE = re.compile(f"[\x00-\x1f{_OTHER_UNSAFE}]")
# The same set with newline and tab let through (multi-line text: answers, contexts).
_TERMINAL_UNSAFE_MULTILINE_RE = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER_UNSAFE}]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _visible(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def terminal_text(value: object, multiline: bool = False) -> str:
    """Any value as text a terminal shows as is: every control character written out (ESC -> `\\x1b`).

    multiline keeps newlines and tabs (sample text, contexts); otherwise they are written out too, so an
    id or a file name stays on its one line.
    """
    pattern = _TERMINAL_UNSAFE_MULTILINE_RE if multiline else _TERMINAL_UNSAFE_RE
    return pattern.sub(lambda m: _visible(m.group()), str(value))


def terminal_markup(value: object, multiline: bool = False) -> str:
    """`terminal_text`, then rich markup escaped: for untrusted text inside a string rich parses as markup."""
    return _rich_escape(terminal_text(value, multiline))


def echo(message: object = "", err: bool = False, nl: bool = True) -> None:
    """Print a line of the CLI's own output (stdout, or stderr with `err`): file names, ids and anything else
    read from files or given by the user inside it are shown as text, never acted on by the terminal (line
    breaks and tabs kept)."""
    typer.echo(terminal_text(message, multiline=True), err=err, nl=nl)
