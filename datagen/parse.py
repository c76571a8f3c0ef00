"""LLM text -> LLaVA samples, or a reject with a named reason."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from datagen.sample import IMAGE_TOKEN, Sample, plain_record
from datagen.splits import SPLIT_SPECS

# A `Question:` / `Answer:` label at the start of a line, tolerating markdown and numbering
# ("**Question 2:**", "Q:", "- Answer:").
_LABEL = re.compile(
    r"^[ \t>*#_\-]*(?:\d+[.)]\s*)?(question|answer|q|a)\s*\d*\s*[:：]\s*(?:\*\*|__)?[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
# A separator line between blocks: LLaVA's few-shot responses put `===` between every question and answer.
_SEPARATOR_LINE = re.compile(r"^[ \t]*(?:={3,}|-{3,}|\*{3,}|_{3,})[ \t]*$", re.MULTILINE)
_DETAIL_PREFIX = re.compile(r"^\s*(?:\*\*)?(?:detailed description|description|answer)\s*:\s*(?:\*\*)?\s*", re.I)


# Every reason a completion can fail to parse; rejects files carry them beside the quality checks' codes.
PARSE_REASON_CODES = ("empty_output", "no_qa_format", "unbalanced_turns", "empty_turn", "too_few_turns", "truncated",
                      "wrong_format", "invalid_sample")


class ParseError(ValueError):
    """The completion could not be turned into a sample; `code` names why."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in PARSE_REASON_CODES:  # a new code must be listed, so `review --reason` can offer it
            raise ValueError(f"unlisted parse reason code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ParseRules:
    """How many Q/A pairs each split accepts."""

    min_pairs: dict[str, int] = field(
        default_factory=lambda: {s.name: s.min_pairs for s in SPLIT_SPECS.values() if s.min_pairs is not None})
    max_pairs: dict[str, int] = field(
        default_factory=lambda: {s.name: s.max_pairs for s in SPLIT_SPECS.values() if s.max_pairs is not None})


_DEFAULT_RULES = ParseRules()
_TRAILING_BOLD = re.compile(r"[ \t]*(\*\*|__)[ \t]*$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def _clean(text: str) -> str:
    """Block content without separator lines, trailing bold markers or surrounding blank lines.

    Each pattern runs only where the text holds what every match of it contains (three of a separator's
    characters, a bold marker, three newlines): the same result for less work on the usual block.
    """
    if "===" in text or "---" in text or "***" in text or "___" in text:
        text = _SEPARATOR_LINE.sub("", text)
    text = text.strip()
    if "**" in text or "__" in text:
        text = _TRAILING_BOLD.sub("", text).strip()
    # Removing a separator between two paragraphs can leave three or more newlines: keep one blank line.
    return _BLANK_LINES.sub("\n\n", text) if text.count("\n") >= 3 else text


def split_qa(text: str) -> list[tuple[str, str]]:
    """Labelled blocks of the text as (kind, content) with kind "q" or "a", in order."""
    matches = list(_LABEL.finditer(text))
    blocks = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        kind = "q" if m.group(1).lower().startswith("q") else "a"
        blocks.append((kind, _clean(text[m.end() : end])))
    return blocks


def parse_pairs(text: str, split: str, truncated: bool, rules: ParseRules) -> list[tuple[str, str]]:
    """Question/answer pairs of a conversation or reasoning completion."""
    blocks = split_qa(text)
    if not blocks:
        raise ParseError("no_qa_format", "no 'Question:'/'Answer:' lines found")
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for kind, content in blocks:
        if kind == "q":
            if pending is not None:
                raise ParseError("unbalanced_turns", "a question has no answer")
            pending = content
        else:
            if pending is None:
                raise ParseError("unbalanced_turns", "an answer has no question")
            pairs.append((pending, content))
            pending = None
    if truncated:
        # The last answer was cut by the token limit: drop it rather than train on half a sentence.
        if pairs and pending is None:
            pairs.pop()
        pending = None
    if pending is not None:
        spec = SPLIT_SPECS.get(split)
        if spec is not None and spec.drops_dangling_question and len(pairs) >= rules.min_pairs[split]:
            pending = None  # a dangling final question costs nothing to drop
        else:
            raise ParseError("unbalanced_turns", "the last question has no answer")
    for q, a in pairs:
        if not q or not a:
            raise ParseError("empty_turn", "a question or answer is empty")
    need = rules.min_pairs[split]
    if len(pairs) < need:
        code = "truncated" if truncated else "too_few_turns"
        raise ParseError(code, f"{len(pairs)} complete question/answer pairs, need {need}")
    return pairs[: rules.max_pairs[split]]


def parse_turns(*, split: str, text: str, instruction: str | None, truncated: bool = False,
                rules: ParseRules | None = None) -> list[tuple[str, str]]:
    """The sample's (speaker, value) turns parsed from a completion, or raise ParseError."""
    rules = rules or _DEFAULT_RULES
    text = text.strip()
    if not text:
        raise ParseError("empty_output", "the model returned no text")
    if split == "detail":
        if truncated:
            raise ParseError("truncated", "the description hit the token limit")
        if split_qa(text):
            raise ParseError("wrong_format", "a detail description came back as questions and answers")
        description = _clean(_DETAIL_PREFIX.sub("", text))
        if instruction is None:
            raise ValueError("detail samples need an instruction")
        pairs = [(instruction, description)]
    else:
        pairs = parse_pairs(text, split, truncated, rules)
    turns = []
    for i, (question, answer) in enumerate(pairs):
        question = question.replace(IMAGE_TOKEN, "").strip()
        answer = answer.replace(IMAGE_TOKEN, "").strip()
        turns.append(("human", f"{IMAGE_TOKEN}\n{question}" if i == 0 else question))
        turns.append(("gpt", answer))
    return turns


def build_record(
    *,
    split: str,
    text: str,
    sample_id: str,
    image: str,
    instruction: str | None,
    meta: dict[str, Any],
    truncated: bool = False,
    rules: ParseRules | None = None,
) -> dict[str, Any]:
    """Parse one completion into the sample as written (the validated Sample's record) or raise ParseError.

    Made without the model where its fields need no conversion (`datagen.sample.plain_record`: a judge makes one
    per completion), through the model otherwise.
    """
    turns = parse_turns(split=split, text=text, instruction=instruction, truncated=truncated, rules=rules)
    record = plain_record(sample_id, image, turns, split, meta)
    return record if record is not None else _model(sample_id, image, turns, split, meta).to_record()


def build_sample(**fields: Any) -> Sample:
    """`build_record(**fields)` as a validated Sample (for readers of its attributes)."""
    return Sample.model_validate(build_record(**fields))


def _model(sample_id: str, image: str, turns: list[tuple[str, str]], split: str, meta: dict[str, Any]) -> Sample:
    try:
        return Sample(id=sample_id, image=image, conversations=[{"from": s, "value": v} for s, v in turns],
                      split=split, meta=meta)
    except ValidationError as exc:
        raise ParseError("invalid_sample", exc.errors()[0]["msg"]) from None
