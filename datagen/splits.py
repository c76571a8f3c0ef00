"""The generation splits, in one table: what the writer sees, how a completion is read, LLaVA's folder name."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitSpec:
    """One split: its name, whether the context lists boxes, its question/answer pair limits."""

    name: str
    with_boxes: bool
    # None: the completion is a plain description (one pair made with an instruction from a list).
    min_pairs: int | None
    max_pairs: int | None
    # The task folder of LLaVA's published prompts (playground/data/prompts/<folder>), if LLaVA has one.
    llava_folder: str | None = None
    # The context also lists objects absent from the image (negative split).
    with_absent_objects: bool = False
    # Answers may carry [x1, y1, x2, y2] boxes (the source-leak check allows them here only).
    boxes_in_text: bool = False
    # A final question without an answer may be dropped (multi-turn splits).
    drops_dangling_question: bool = False


SPLIT_SPECS: dict[str, SplitSpec] = {
    spec.name: spec
    for spec in (
        # LLaVA's conversation split used captions only.
        SplitSpec("conversation", False, 2, 10, "conversation", drops_dangling_question=True),
        SplitSpec("detail", True, None, None, "detail_description"),
        SplitSpec("reasoning", True, 1, 1, "complex_reasoning"),
        SplitSpec("negative", True, 1, 10, with_absent_objects=True, drops_dangling_question=True),
        SplitSpec("grounded", True, 1, 10, boxes_in_text=True, drops_dangling_question=True),
    )
}
SPLITS: tuple[str, ...] = tuple(SPLIT_SPECS)
# LLaVA-Instruct-158K's three: what `make data` runs by default.
LLAVA_SPLITS: tuple[str, ...] = ("conversation", "detail", "reasoning")
SPLITS_WITH_BOXES = frozenset(s.name for s in SPLIT_SPECS.values() if s.with_boxes)
SPLITS_WITH_BOXES_IN_TEXT = frozenset(s.name for s in SPLIT_SPECS.values() if s.boxes_in_text)
