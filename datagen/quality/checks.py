"""Sample checks: each a small function with a named reason code, registered in one table."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from datagen.errors import VisinstructError
from datagen.quality.coherence import (check_paraphrased_question, check_self_reference, check_subject_mismatch,
                                       question_word_sets)
from datagen.quality.config import QualityConfig
from datagen.quality.counting import check_wrong_count, check_wrong_position
from datagen.quality.generic import asserted_categories
from datagen.quality.grounding import check_invented_box, check_malformed_box, check_no_box
from datagen.quality.negation import check_absent_not_denied, check_absent_object_named
from datagen.quality.minhash import NearDuplicateIndex, jaccard
from datagen.quality.objects import ObjectMatcher, default_matcher
from datagen.sample import IMAGE_TOKEN, image_path_problem
from datagen.quality.view import CheckEnv, SampleView, _strip_image  # noqa: F401  (re-exported)
from datagen.splits import SPLITS_WITH_BOXES_IN_TEXT


def _words(text: str) -> list[str]:
    return _strip_image(text).split()


# --- structure ---------------------------------------------------------------------------------


def check_roles(view: SampleView, env: CheckEnv) -> str | None:
    """Turns alternate human, gpt, ... starting with human, in complete pairs."""
    if len(view.turns) < 2:
        return f"{len(view.turns)} turns; a sample needs at least a question and an answer"
    for i, (speaker, _) in enumerate(view.turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker != expected:
            return f"turn {i} is from {speaker!r}, expected {expected!r}"
    if len(view.turns) % 2:
        return "the last question has no answer"
    return None


def check_image_token(view: SampleView, env: CheckEnv) -> str | None:
    """<image> exactly once, at the start of the first human turn (none in a text-only sample)."""
    total = sum(value.count(IMAGE_TOKEN) for _, value in view.turns)
    if not view.has_image:
        return f"a sample without an image contains {IMAGE_TOKEN}" if total else None
    if total != 1:
        return f"{IMAGE_TOKEN} appears {total} times, expected once"
    first = view.turns[0][1] if view.turns else ""
    if IMAGE_TOKEN not in first:
        return f"{IMAGE_TOKEN} is not in the first turn"
    if first.startswith(IMAGE_TOKEN):
        return None
    if env.config.image_token_position == "start_or_end" and first.rstrip().endswith(IMAGE_TOKEN):
        return None
    return f"{IMAGE_TOKEN} is not at the start of the first human turn"


def check_bad_image_path(view: SampleView, env: CheckEnv) -> str | None:
    """The image, if any, is a relative path inside the image folder (datagen.sample's path rule)."""
    if view.image is None or view.image == "":
        return None
    problem = image_path_problem(view.image)
    return None if problem is None else f"image {view.image!r} {problem}"


def check_empty_turn(view: SampleView, env: CheckEnv) -> str | None:
    """No turn is empty once <image> is removed."""
    for i, (_, value) in enumerate(view.turns):
        if not _strip_image(value):
            return f"turn {i} is empty"
    return None


# --- content -----------------------------------------------------------------------------------

_SOURCE_WORDS = r"(?:text|texts|captions?|descriptions?|annotations?|context|data|information|details|coordinates|boxes)"
# Phrases that reveal the writer read text about the image rather than seeing it; any turn.
_LEAK_ANY_TURN = [
    re.compile(r"\bbounding[ -]?box(?:es)?\b", re.I),
    re.compile(r"\bbox(?:es)? coordinates?\b|\bcoordinates?\b", re.I),
    re.compile(r"\[\s*-?\d*\.?\d+\s*(?:,\s*-?\d*\.?\d+\s*)+\]"),  # [0.23, 0.41, ...]
    re.compile(r"(?<![\d.])\d\.\d{3}(?![\d])"),  # 0.234: normalised coordinates
    re.compile(rf"\b(?:the|these|those) (?:given|provided|above|following) {_SOURCE_WORDS}\b", re.I),
    re.compile(rf"\baccording to the {_SOURCE_WORDS}\b", re.I),
    re.compile(rf"\b(?:described|mentioned|stated|noted|listed|given) (?:in|by) the {_SOURCE_WORDS}\b", re.I),
    re.compile(r"\bthe captions?\b|\bcaptions? (?:says?|mentions?|states?|describes?|reads?)\b", re.I),
    re.compile(r"\bthe descriptions? (?:says?|mentions?|states?|indicates?|suggests?)\b", re.I),
    re.compile(r"\bannotat(?:ion|ions|ed|or|ors)\b", re.I),
]
# Answers never need the word at all: a reader of the image sees no caption.
_LEAK_ANSWER = [re.compile(r"\bcaptions?\b|\bcaptioned\b", re.I)]


# Positions in _LEAK_ANY_TURN of the box list and of the 3-decimal number: allowed where boxes are the content.
_BOX_PATTERNS = frozenset({2, 3})


# Prefilters. The phrase patterns are case-insensitive and scanning a text with one costs far more than
# looking for a few plain words in it, so each pattern comes with what it cannot match without: lower-case
# words (a match contains one of them, so one must be in the lower-cased text) or a pattern (it must match
# the text). A sample without any of them skips the pattern; otherwise the pattern runs exactly as before,
# so the decision and the reported phrase stay the same. tests/test_quality_speed_equivalence.py pins this.
Needs = tuple[str | re.Pattern[str], ...]


@dataclass(frozen=True)
class _Prefilter:
    """A pattern's needs split by kind, for a quick test."""

    words: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def of(cls, needs: Needs) -> "_Prefilter":
        return cls(tuple(n for n in needs if isinstance(n, str)), tuple(n for n in needs if not isinstance(n, str)))

# The non-ASCII letters that re.IGNORECASE matches to an ASCII letter but str.lower() does not turn into
# one (İ, ı, ſ, and the Kelvin sign); in a text with any of them the patterns run without prefilter.
_CASE_FOLD_TRAPS = re.compile("[\u0130\u0131\u017f\u212a]")


def _lowered(text: str) -> str | None:
    """The text lower-cased for the word prefilters, or None where lower-casing could hide a match."""
    if not text.isascii() and _CASE_FOLD_TRAPS.search(text):
        return None
    return text.lower()


def _may_match(needs: _Prefilter, text: str, lowered: str | None) -> bool:
    """Whether the text has one of the needed words or patterns (always True when `lowered` is None)."""
    if lowered is None:
        return True
    return any(map(lowered.__contains__, needs.words)) or any(p.search(text) for p in needs.patterns)


_LEAK_ANY_TURN_NEEDS: list[Needs] = [
    ("bounding",),
    ("coordinate",),
    ("[",),
    (re.compile(r"\d\.\d"),),
    ("given", "provided", "above", "following"),
    ("according",),
    ("described", "mentioned", "stated", "noted", "listed", "given"),
    ("caption",),
    ("description",),
    ("annotat",),
]
_LEAK_ANSWER_NEEDS: list[Needs] = [("caption",)]
_LEAK_ANY_TURN_FILTERS = [_Prefilter.of(n) for n in _LEAK_ANY_TURN_NEEDS]
_LEAK_ANSWER_FILTERS = [_Prefilter.of(n) for n in _LEAK_ANSWER_NEEDS]
# The same needs indexed the other way, so each word is looked for once: word (or pattern) -> positions
# in _LEAK_ANY_TURN + _LEAK_ANSWER of the patterns that need it.
_LEAK_BY_WORD: dict[str, list[int]] = {}
_LEAK_BY_PATTERN: list[tuple[re.Pattern[str], int]] = []
for _i, _filter in enumerate(_LEAK_ANY_TURN_FILTERS + _LEAK_ANSWER_FILTERS):
    for _word in _filter.words:
        _LEAK_BY_WORD.setdefault(_word, []).append(_i)
    _LEAK_BY_PATTERN += [(_need, _i) for _need in _filter.patterns]


def _possible_leaks(text: str) -> set[int]:
    """Positions in _LEAK_ANY_TURN + _LEAK_ANSWER of the patterns whose needs the text has."""
    lowered = _lowered(text)
    if lowered is None:
        return set(range(len(_LEAK_ANY_TURN) + len(_LEAK_ANSWER)))
    possible: set[int] = set()
    for word, positions in _LEAK_BY_WORD.items():
        if word in lowered:
            possible.update(positions)
    possible.update(i for need, i in _LEAK_BY_PATTERN if i not in possible and need.search(text))
    return possible


def check_source_leak(view: SampleView, env: CheckEnv) -> str | None:
    """No mention of captions, given descriptions, boxes, coordinates or coordinate-like numbers."""
    possible = _possible_leaks("\n".join(value for _, value in view.turns))
    if not possible:
        return None
    if view.split in SPLITS_WITH_BOXES_IN_TEXT:
        # Boxes are the point of this split (grounding checks them); words about sources still leak.
        possible -= _BOX_PATTERNS
    any_turn = [p for i, p in enumerate(_LEAK_ANY_TURN) if i in possible]
    answer_only = [p for i, p in enumerate(_LEAK_ANSWER, start=len(_LEAK_ANY_TURN)) if i in possible]
    for speaker, value in view.turns:
        patterns = any_turn + (answer_only if speaker == "gpt" else [])
        for pattern in patterns:
            found = pattern.search(value)
            if found:
                return f"{speaker} turn mentions {found.group(0)!r}"
    return None


_REFUSAL = re.compile(
    r"\bI(?:'m| am) (?:sorry|afraid)\b|\bI apologi[sz]e\b"
    r"|\bI(?: can(?:no|'|’)t| cannot| do not| don(?:'|’)t|(?:'m|’m| am) (?:unable|not able) to) "
    r"(?:see|view|look at|access|perceive|analy[sz]e|process|provide|help|describe|tell|determine|answer)\b"
    r"|\bunable to (?:see|view|access|process) (?:the |this |any )?(?:image|picture|photo)"
    r"|\b(?:no|without an?) (?:image|picture|photo) (?:is |was |has been )?(?:provided|attached|shared|given|available)"
    r"|\bwithout (?:seeing|viewing|access to) the (?:image|picture|photo)",
    re.I,
)
_SELF_TALK = re.compile(
    r"\bas an? (?:AI|artificial intelligence|language model|large language model|text-based|assistant)\b"
    r"|\b(?:I am|I'm) (?:an? )?(?:AI|language model|text-based|large language model|chatbot|virtual assistant)\b"
    r"|\blanguage model\b"
    r"|\bI (?:do not|don't) have (?:eyes|vision|visual|personal|the ability|access)\b"
    r"|^\s*(?:sure|certainly|of course|okay|ok)\b[,!.]"
    r"|\bhere (?:is|are) (?:a|an|the|some|my)? ?(?:conversation|dialogue|questions?|answers?|description|response|q&a)\b"
    r"|\b(?:I hope this helps|let me know if|feel free to ask)\b"
    r"|^\s*\(?note\s*:",
    re.I | re.M,
)


# Per branch of _REFUSAL, in order: sorry/afraid; apologi[sz]e; "I can't/cannot/do not/don't/'m unable/
# not able to"; "unable to"; "no image/picture/photo", "without a(n) image"; "without seeing/viewing/access".
_REFUSAL_NEEDS: Needs = (
    "sorry", "afraid", "apologi", "i can", "i do not", "i don", "unable", "not able",
    "no image", "no picture", "no photo", "without",
)
# Per branch of _SELF_TALK, in order: "as a(n) AI/...", "I am/I'm ...", "language model", "I do not/don't
# have ...", "Sure," and the like (the word right before , ! or .), "here is/are <what>" (by what: "here is"
# alone is in every "there is"), the sign-offs, "note:".
_SELF_TALK_NEEDS: Needs = (
    "as a ai", "as an ai", "artificial intelligence", "language model", "text-based", "assistant",
    "i am", "i'm",
    "i do not have", "i don't have",
    *(word + mark for word in ("sure", "certainly", "of course", "okay", "ok") for mark in ",!."),
    "conversation", "dialogue", "question", "answer", "description", "response", "q&a",
    "i hope this helps", "let me know if", "feel free to ask",
    "note",
)
_REFUSAL_FILTER = _Prefilter.of(_REFUSAL_NEEDS)
_SELF_TALK_FILTER = _Prefilter.of(_SELF_TALK_NEEDS)


def _first_answer_match(view: SampleView, prefilter: "_Prefilter", pattern: re.Pattern[str]) -> re.Match[str] | None:
    """The first match of `pattern` in the answers, skipping the regex when the prefilter rules it out."""
    answers = view.answers
    text = "\n".join(answers)
    if not _may_match(prefilter, text, _lowered(text)):
        return None
    for answer in answers:
        found = pattern.search(answer)
        if found:
            return found
    return None


# In a negative sample "I don't see a dog here" is the answer, not a refusal.
_DENIAL_AFTER_SEE = re.compile(r"\s+(?:a|an|any|anything|the|such|one|no)\b", re.I)


def check_refusal(view: SampleView, env: CheckEnv) -> str | None:
    """No answer declines or apologises instead of answering."""
    found = _first_answer_match(view, _REFUSAL_FILTER, _REFUSAL)
    if found and view.split == "negative":
        found = next((m for answer in view.answers for m in _REFUSAL.finditer(answer)
                      if not (m.group(0).lower().endswith("see") and _DENIAL_AFTER_SEE.match(answer, m.end()))), None)
    return f"answer says {found.group(0)!r}" if found else None


def check_ai_self_talk(view: SampleView, env: CheckEnv) -> str | None:
    """No answer talks about being an AI or about the writing task ("Here are the questions")."""
    found = _first_answer_match(view, _SELF_TALK_FILTER, _SELF_TALK)
    return f"answer says {found.group(0).strip()!r}" if found else None


_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]*_]*$")
_SENTENCE_STOPS = ".!?…"
_SENTENCE_CLOSERS = "\"'”’)]*_"
_TRAILING_NON_WORD = re.compile(r"\W+$")


def _ends_sentence(text: str) -> bool:
    """Whether _SENTENCE_END matches, read from the end: a stop, then only closing quotes or brackets."""
    # The two character sets do not overlap, so the stop must be the character before the closers at the
    # end; `$` also matches before one final newline, hence the second try.
    for end in (text, text[:-1] if text.endswith("\n") else ""):
        before = end.rstrip(_SENTENCE_CLOSERS)
        if before and before[-1] in _SENTENCE_STOPS:
            return True
    return False
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")
_DANGLING = frozenset(
    "and or but the a an of to with in on at for from by as is are was were that which their its his her this "
    "these those while because if than like into onto about between through some very several many my our your "
    "has have had be been being can will would could should also such so then who where when whose".split()
)


def check_truncated(view: SampleView, env: CheckEnv) -> str | None:
    """Not cut off: the completion did not hit its token limit and no answer stops mid-sentence."""
    config = env.config
    if config.truncate_on_finish_length and view.finish_reason == "length":
        return "the completion stopped at the token limit"
    for i, answer in enumerate(view.answers):
        text = answer.rstrip()
        if not text:
            continue
        words = text.split()
        last_word = _TRAILING_NON_WORD.sub("", words[-1]).lower()
        ends = _ends_sentence(text)
        if text[-1] in ",;:-–" or (last_word in _DANGLING and not ends):
            return f"answer {i + 1} ends mid-sentence: {text[-40:]!r}"
        if (
            view.split not in config.unpunctuated_splits
            and len(words) >= config.min_words_needing_final_punctuation
            and not ends
            and not _LIST_ITEM.match(text.splitlines()[-1])
        ):
            return f"answer {i + 1} does not end a sentence: {text[-40:]!r}"
    return None


def check_too_short(view: SampleView, env: CheckEnv) -> str | None:
    """Every answer has at least the split's minimum number of words."""
    bounds = env.config.bounds(view.split)
    for i, answer in enumerate(view.answers):
        n = len(_words(answer))
        if 0 < n < bounds.min_answer_words:  # empty answers are empty_turn's
            return f"answer {i + 1} has {n} words, below {bounds.min_answer_words} for {view.split or 'default'}"
    return None


def check_too_long(view: SampleView, env: CheckEnv) -> str | None:
    """No answer or question exceeds the split's maximum number of words."""
    bounds = env.config.bounds(view.split)
    for i, answer in enumerate(view.answers):
        n = len(_words(answer))
        if n > bounds.max_answer_words:
            return f"answer {i + 1} has {n} words, above {bounds.max_answer_words} for {view.split or 'default'}"
    for i, question in enumerate(view.questions):
        n = len(_words(question))
        if n > bounds.max_question_words:
            return f"question {i + 1} has {n} words, above {bounds.max_question_words}"
    return None


def check_repeated_question(view: SampleView, env: CheckEnv) -> str | None:
    """No question is asked twice (same words, or nearly) in one conversation."""
    questions = question_word_sets(view, env)
    for i in range(len(questions)):
        for j in range(i):
            if questions[i] and jaccard(questions[i], questions[j]) >= env.config.repeated_question_similarity:
                return f"question {i + 1} repeats question {j + 1}: {view.questions[i][:120]!r}"
    return None


def check_hallucinated_object(view: SampleView, env: CheckEnv) -> str | None:
    """Answers name no COCO object that is neither boxed nor captioned for the image."""
    if view.record is None:
        return None
    hallucinated = object_findings(view, env)[1]
    if hallucinated and env.config.lenient_object_mentions:
        # The gate's leniency (not CHAIR's): objects only spoken of in general, in comparisons, or denied
        # after the word ("the dog is not in the picture") are not claims that the image holds them.
        hallucinated &= asserted_categories("\n".join(view.answers), env.matcher, env.config.count_hedged_mentions)
    if len(hallucinated) > env.config.max_hallucinated_objects:
        return f"{', '.join(sorted(hallucinated))} not in the image's boxes or captions"
    return None


def object_findings(view: SampleView, env: CheckEnv) -> tuple[set[str], set[str]]:
    """(categories the answers name, those of them the image is not known to contain); computed once per sample
    (the hallucination check and the report both ask)."""
    key = ("object_findings", id(view))
    kept = env.memo.get(key)
    if kept is None:
        kept = env.memo[key] = (view, _object_findings(view, env))  # the view kept alive, so its id is not reused
    mentioned, hallucinated = kept[1]
    return mentioned.copy(), hallucinated.copy()


def _object_findings(view: SampleView, env: CheckEnv) -> tuple[set[str], set[str]]:
    answers = view.answers
    env.matcher.scan_joined(answers)  # each answer's scan, and theirs together, for this and the later checks
    mentioned = env.mentioned("\n".join(answers), env.config.count_hedged_mentions)
    if view.record is None:
        return mentioned, set()
    return mentioned, env.unknown(view.record, mentioned)


@dataclass(frozen=True)
class Check:
    """A registered check: its reason code, what it tests, and the function."""

    code: str
    description: str
    run: Callable[[SampleView, CheckEnv], str | None]


CHECKS: tuple[Check, ...] = (
    Check("bad_roles", "turns alternate human/gpt, starting with human, in complete pairs", check_roles),
    Check("image_token", "<image> exactly once, at the start of the first human turn", check_image_token),
    Check("empty_turn", "no empty turn", check_empty_turn),
    Check("bad_image_path", "the image path is relative and stays in the image folder (no absolute path, '..', URL, "
          "NUL or non-string)", check_bad_image_path),
    Check("source_leak", "no mention of captions, given descriptions, boxes, coordinates", check_source_leak),
    Check("refusal", "no refusal or apology instead of an answer", check_refusal),
    Check("ai_self_talk", "no talk about being an AI or about the writing task", check_ai_self_talk),
    Check("truncated", "not cut at the token limit or mid-sentence", check_truncated),
    Check("too_short", "answers at least the split's minimum length", check_too_short),
    Check("too_long", "answers and questions within the split's maximum length", check_too_long),
    Check("repeated_question", "no question asked twice in a conversation", check_repeated_question),
    Check("paraphrased_question", "no question restates an earlier one (a modifier added, or the same words reworded)",
          check_paraphrased_question),
    Check("subject_mismatch", "an answer is about its question's subject (asked about the woman, not about the man)",
          check_subject_mismatch),
    Check("self_reference", "no answer refers to its own writing ('as I mentioned', 'the description above')",
          check_self_reference),
    Check("hallucinated_object", "answers name only objects boxed or captioned for the image", check_hallucinated_object),
    Check("wrong_count", "a number attached to a boxed object agrees with its boxes (crowds, captions tolerated)",
          check_wrong_count),
    Check("wrong_position", "left/right/above/below claims about two uniquely boxed objects agree with their centres",
          check_wrong_position),
    Check("absent_not_denied", "negative: a question asks about an absent object and its answer denies it",
          check_absent_not_denied),
    Check("absent_object_named", "negative: no answer names an absent object it was not asked about",
          check_absent_object_named),
    Check("malformed_box", "grounded: every box parses as [x1, y1, x2, y2] in [0, 1], 3 decimals at most",
          check_malformed_box),
    Check("invented_box", "grounded: each box matches an annotated box of the named object (IoU >= 0.5)",
          check_invented_box),
    Check("no_box", "grounded: some question or answer refers to a region with a box", check_no_box),
)
NEAR_DUPLICATE = "near_duplicate"
REASON_CODES: tuple[str, ...] = tuple(c.code for c in CHECKS) + (NEAR_DUPLICATE,)
REASON_DESCRIPTIONS: dict[str, str] = {
    **{c.code: c.description for c in CHECKS},
    NEAR_DUPLICATE: "answers not a near-copy of an earlier accepted sample (MinHash)",
}


@dataclass
class SampleReport:
    """Outcome of all checks on one sample."""

    reasons: list[str]
    details: dict[str, str]
    mentioned: set[str]
    hallucinated: set[str]
    objects_checked: bool

    @property
    def accepted(self) -> bool:
        return not self.reasons


class QualityChecker:
    """Runs the registered checks over a stream of samples, remembering accepted ones for near-duplicates."""

    def __init__(self, config: QualityConfig | None = None, matcher: ObjectMatcher | None = None) -> None:
        config = config or QualityConfig()
        unknown = set(config.disabled_checks) - set(REASON_CODES)
        if unknown:
            raise VisinstructError(f"unknown check(s) to disable: {', '.join(sorted(unknown))}",
                                   f"use reason codes from: {', '.join(REASON_CODES)}")
        self.env = CheckEnv(
            config=config,
            matcher=matcher or default_matcher(),
            near_duplicates=NearDuplicateIndex(
                config.near_duplicate_threshold, config.shingle_size, config.minhash_permutations
            ),
        )

    @property
    def config(self) -> QualityConfig:
        return self.env.config

    def remember(self, view: SampleView) -> None:
        """Add an already accepted sample to the near-duplicate memory without checking it."""
        text = "\n".join(view.answers)
        if text.strip() and view.split not in self.config.near_duplicate_skip_splits:
            self.env.near_duplicates.insert(view.key, self.env.near_duplicates.signature(text))

    def check(self, view: SampleView) -> SampleReport:
        """All checks on one sample; an accepted sample joins the near-duplicate index."""
        disabled = set(self.config.disabled_checks)
        details: dict[str, str] = {}
        self.env.memo.clear()
        for check in CHECKS:
            if check.code in disabled:
                continue
            detail = check.run(view, self.env)
            if detail is not None:
                details[check.code] = detail
        mentioned, hallucinated = object_findings(view, self.env)
        if NEAR_DUPLICATE not in disabled and view.split not in self.config.near_duplicate_skip_splits:
            text = "\n".join(view.answers)
            if text.strip():
                sig = self.env.near_duplicates.signature(text)
                match = self.env.near_duplicates.match(sig)
                if match is not None:
                    details[NEAR_DUPLICATE] = f"answers ~{match[1]:.2f} similar to sample {match[0]}"
                elif not details:
                    self.env.near_duplicates.insert(view.key, sig)
        return SampleReport(
            reasons=list(details), details=details, mentioned=mentioned, hallucinated=hallucinated,
            objects_checked=view.record is not None and "hallucinated_object" not in disabled,
        )
