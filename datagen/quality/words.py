"""The two ways the checks cut text into words, each with a fast path for ASCII text.

`words` is `re.findall("[a-z0-9]+", text)` and `tokens` is `re.findall('[a-z]+|[0-9]+|[.,;:!?()"]', text)` on
text already lower-cased. On ASCII text (nearly every LLM answer and COCO caption) both are computed by mapping
every character that no token holds to a space in one `str.translate` (CPython's 1:1 ASCII fast path) and
splitting on whitespace, which is 2-3x cheaper than the regex's scan; any other text takes the regex. The results
are the same lists: tests/test_quality_speed_equivalence.py compares them on generated texts.
"""
from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")
_TOKEN = re.compile(r"[a-z]+|[0-9]+|[.,;:!?()\"]")
_MARKS = '.,;:!?()"'  # the punctuation `tokens` keeps, each a token of its own
_DIGITS = "0123456789"

_ALNUM = frozenset(range(ord("0"), ord("9") + 1)) | frozenset(range(ord("a"), ord("z") + 1))
# ASCII characters no word holds -> space (upper-case letters too: the callers lower-case first).
_WORD_GAPS = {c: " " for c in range(128) if c not in _ALNUM}
# ASCII characters no token holds -> space; the marks stay, to be spaced out.
_TOKEN_GAPS = {c: " " for c in range(128) if c not in _ALNUM and chr(c) not in _MARKS}
# Letters -> "a", digits -> "0": where "a0" or "0a" occurs, a letter run touches a digit run.
_CLASSES = {c: "0" if chr(c) in _DIGITS else "a" for c in _ALNUM}


def words(text: str) -> list[str]:
    """The runs of [a-z0-9] in lower-cased text, in order."""
    if text.isascii():
        return text.translate(_WORD_GAPS).split()
    return _WORD.findall(text)


def tokens(text: str) -> list[str]:
    """The runs of [a-z], the runs of [0-9] and each clause mark of lower-cased text, in order."""
    if not text.isascii():
        return _TOKEN.findall(text)
    spaced = text.translate(_TOKEN_GAPS)
    if any(digit in spaced for digit in _DIGITS):
        classes = spaced.translate(_CLASSES)
        if "a0" in classes or "0a" in classes:  # "3rd" is two tokens; splitting on spaces would keep one
            return _TOKEN.findall(text)
    for mark in _MARKS:
        if mark in spaced:
            spaced = spaced.replace(mark, f" {mark} ")
    return spaced.split()
