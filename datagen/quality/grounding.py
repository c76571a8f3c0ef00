"""Boxes in text ([x1, y1, x2, y2], normalised): parsing, IoU, and the checks of the grounded split."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datagen.coco import normalised_box
from datagen.coco import ImageRecord
from datagen.quality.objects import ObjectMatcher, tokenize

if TYPE_CHECKING:  # the check registry imports this module; the types are for reading only
    from datagen.quality.view import CheckEnv, SampleView

# Anything in square brackets that holds a digit: a box, or an attempt at one (which must then parse).
_BRACKETS = re.compile(r"\[([^\[\]]*\d[^\[\]]*)\]")
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?|-?\.\d+)\s*$")
MAX_DECIMALS = 3
MATCH_IOU = 0.5
# A box belongs to the object named this many words before it at most ("the dog lying on the left [..]").
ATTACH_WINDOW = 6
_CLAUSE_END = frozenset(".;:!?()\"")


@dataclass(frozen=True)
class TextBox:
    """One bracketed box in a text: where it is, its numbers (None if malformed) and why it is malformed."""

    start: int
    end: int
    raw: str
    box: tuple[float, float, float, float] | None
    problem: str = ""


def parse_boxes(text: str) -> list[TextBox]:
    """Every [..] with a digit in the text, parsed as [x1, y1, x2, y2] in [0, 1] with at most 3 decimals."""
    found = []
    for m in _BRACKETS.finditer(text):
        parts = m.group(1).split(",")
        numbers = [_NUMBER.match(p) for p in parts]
        raw = m.group(0)
        if len(parts) != 4 or not all(numbers):
            found.append(TextBox(m.start(), m.end(), raw, None, "not four numbers"))
            continue
        texts = [n.group(1) for n in numbers]
        values = tuple(float(t) for t in texts)
        if any("." in t and len(t.split(".")[1]) > MAX_DECIMALS for t in texts):
            problem = f"more than {MAX_DECIMALS} decimals"
        elif not all(0.0 <= v <= 1.0 for v in values):
            problem = "a coordinate outside [0, 1]"
        elif not (values[0] < values[2] and values[1] < values[3]):
            problem = "x2 <= x1 or y2 <= y1"
        else:
            problem = ""
        found.append(TextBox(m.start(), m.end(), raw, None if problem else values, problem))  # type: ignore[arg-type]
    return found


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def annotated_boxes(record: ImageRecord) -> list[tuple[str, tuple[float, ...]]]:
    """(category, normalised box) of every annotation, as the writer saw them."""
    return [(o.category, tuple(normalised_box(o, record.width, record.height))) for o in record.objects]


def named_category(text_before: str, matcher: ObjectMatcher) -> str | None:
    """The object named right before a box (within its clause and a few words), if any."""
    tokens = tokenize(text_before)
    for j in range(len(tokens) - 1, -1, -1):
        if tokens[j] in _CLAUSE_END:
            tokens = tokens[j + 1:]
            break
    tokens = tokens[-ATTACH_WINDOW - 3:]
    found = matcher.phrases_in(tokens)
    if not found:
        return None
    start, key, category = found[-1]
    return category if len(tokens) - (start + len(key)) <= ATTACH_WINDOW else None


def box_problems(text: str, record: ImageRecord | None, matcher: ObjectMatcher) -> tuple[list[str], list[str]]:
    """(malformed boxes, invented boxes) of one text, each as a sentence saying what is wrong."""
    malformed, invented = [], []
    truth = annotated_boxes(record) if record is not None else None
    previous_end = 0
    for tb in parse_boxes(text):
        before = text[previous_end:tb.start]
        previous_end = tb.end
        if tb.box is None:
            malformed.append(f"{tb.raw}: {tb.problem}")
            continue
        if truth is None:
            continue
        category = named_category(before, matcher)
        candidates = [b for c, b in truth if category is None or c == category]
        best = max((iou(tb.box, b) for b in candidates), default=0.0)
        if best < MATCH_IOU:
            what = f"{category} {tb.raw}" if category else tb.raw
            kind = f"no annotated {category} box" if category else "no annotated box"
            invented.append(f"{what} matches {kind} (best IoU {best:.2f})")
    return malformed, invented


def check_malformed_box(view: "SampleView", env: "CheckEnv") -> str | None:
    """Grounded split: every bracketed box parses as [x1, y1, x2, y2] in [0, 1] with at most 3 decimals."""
    if view.split != "grounded":
        return None
    for i, (_, value) in enumerate(view.turns):
        malformed, _ = box_problems(value, None, env.matcher)
        if malformed:
            return f"turn {i + 1}: {'; '.join(malformed)}"
    return None


def check_invented_box(view: "SampleView", env: "CheckEnv") -> str | None:
    """Grounded split: each box matches an annotated box (IoU >= 0.5) of the object named before it."""
    if view.split != "grounded" or view.record is None:
        return None
    for i, (_, value) in enumerate(view.turns):
        _, invented = box_problems(value, view.record, env.matcher)
        if invented:
            return f"turn {i + 1}: {'; '.join(invented)}"
    return None


def check_no_box(view: "SampleView", env: "CheckEnv") -> str | None:
    """Grounded split: some question or answer refers to a region with a well-formed box."""
    if view.split != "grounded":
        return None
    if not any(tb.box is not None for _, value in view.turns for tb in parse_boxes(value)):
        return "no question or answer gives a box"
    return None
