"""Negative samples: each answer denies the absent object its question asks about and names no other.

Also the denial reading the other checks share: "the dog is not in the picture" negates a mention
placed after it, which the CHAIR matcher (negators before the word only) does not see.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from datagen.quality.objects import NEGATORS, ObjectMatcher, tokenize

if TYPE_CHECKING:  # the check registry imports this module; the types are for reading only
    from datagen.quality.view import CheckEnv, SampleView

_CLAUSE_END = frozenset(".,;:!?()\"")
_SENTENCE_END = frozenset(".!?")
DENIAL_WINDOW = 5
# A negator this close before the object ("there is no dog", "I don't see any dog") or, after it, a
# verb then one of these ("the dog is not in the picture", "a dog cannot be seen", "the dog is absent").
_BE_VERBS = frozenset("is are was were be can could does do did appears appear seems seem".split())
_PRESENCE = frozenset(
    "in here there present visible seen shown pictured part included anywhere found to appear actually around "
    "nearby visible be".split()
)
_ABSENT_WORDS = frozenset("absent missing nowhere".split())
_PRE_NEGATORS = NEGATORS | frozenset({"nobody", "nothing", "lacks", "lack", "lacking", "absence"})
# Words of a denial that names nothing ("No, there isn't one here.", "There is nobody in the picture.").
_ANAPHOR_NEGATORS = _PRE_NEGATORS
_PRESENCE_WORDS = frozenset(
    "there here such in see seen visible present picture image photo photograph scene frame shot view anything "
    "anyone nobody one ones any".split()
)


def _negated_after(tokens: list[str], end: int) -> bool:
    """'<object> is not in ...', '<object> cannot be seen', '<object> is absent': within the clause after it."""
    for j in range(end, min(len(tokens), end + DENIAL_WINDOW)):
        token = tokens[j]
        if token in _CLAUSE_END:
            return False
        if token in _ABSENT_WORDS and j > end and tokens[j - 1] in _BE_VERBS:
            return True
        if token in ("not", "no", "never") and j > end and tokens[j - 1] in _BE_VERBS:
            following = tokens[j + 1] if j + 1 < len(tokens) else "."
            return following in _PRESENCE or following in _ABSENT_WORDS or following in _CLAUSE_END
    return False


def _negated_before(tokens: list[str], start: int) -> bool:
    """A negator a few words before, in the same clause."""
    for j in range(start - 1, max(-1, start - 1 - DENIAL_WINDOW), -1):
        if tokens[j] in _CLAUSE_END:
            return False
        if tokens[j] in _PRE_NEGATORS:
            return True
    return False


def denied_spans(text: str, matcher: ObjectMatcher) -> tuple[list[str], list[tuple[int, int, str, bool]]]:
    """The text's tokens, and (start, end, category, denied) of every object mention in them."""
    tokens, found = matcher.scan(text)
    return tokens, [
        (i, i + len(key), category, _negated_before(tokens, i) or _negated_after(tokens, i + len(key)))
        for i, key, category in found
    ]


def _first_sentence(tokens: list[str]) -> list[str]:
    """Up to the first sentence end, semicolon or colon ("No, there isn't one; the only fruit is an apple.")."""
    for j, token in enumerate(tokens):
        if token in _SENTENCE_END or token in (";", ":"):
            return tokens[:j]
    return tokens


def answer_denies(answer: str, category: str, matcher: ObjectMatcher) -> tuple[bool, str]:
    """Whether the answer says the object is not there (and never asserts it), with why not."""
    tokens, spans = denied_spans(answer, matcher)
    own = [s for s in spans if s[2] == category]
    if any(not denied for _, _, _, denied in own):
        return False, f"it speaks of {category!r} as present"
    if own:
        return True, ""
    # Not named: a denial in the first sentence that names nothing else ("No, there isn't one here.").
    first = _first_sentence(tokens)
    names_other = any(start < len(first) and not denied for start, _, _, denied in spans)
    if any(t in _ANAPHOR_NEGATORS for t in first) and any(t in _PRESENCE_WORDS for t in first) and not names_other:
        return True, ""
    return False, f"no sentence denies {category!r}"


_PERSON_PRONOUNS = frozenset("who whom whose someone somebody anyone anybody".split())


@lru_cache(maxsize=256)
def phrases_of(matcher: ObjectMatcher, category: str) -> tuple[str, ...]:
    """Every phrase (space-joined tokens) the matcher reads as the category, plurals included."""
    return tuple(" ".join(key) for key, c in matcher.phrases.items() if c == category and key)


def _names_listed(question: str, listed: set[str], matcher: ObjectMatcher) -> set[str]:
    """Listed absent categories a question names by any of their phrases, ambiguous words included.

    The matcher reads "the tie doing" as the verb; a question written to ask about an absent tie means the object.
    """
    tokens = tokenize(question)
    joined = f" {' '.join(tokens)} "
    named = {c for c in listed if any(f" {phrase} " in joined for phrase in phrases_of(matcher, c))}
    # "Who is holding the scissors?" asks about a person without naming one.
    if "person" in listed and any(t in _PERSON_PRONOUNS for t in tokens):
        named.add("person")
    return named


def asked_absent(view: "SampleView", env: "CheckEnv") -> list[tuple[int, set[str], set[str]]]:
    """Per question: (index, absent objects it asks about, all absent objects known for the sample)."""
    key = ("asked_absent",)
    if key not in env.memo:  # both negative checks ask
        env.memo[key] = _asked_absent(view, env)
    return env.memo[key]


def _asked_absent(view: "SampleView", env: "CheckEnv") -> list[tuple[int, set[str], set[str]]]:
    listed = set(view.absent_objects)
    out = []
    for i, question in enumerate(view.questions):
        named = {m.category for m in env.matcher.mentions(question)} | _names_listed(question, listed, env.matcher)
        unknown = env.unknown(view.record, named) if view.record is not None else set()
        asked = {c for c in named if c in listed or c in unknown}
        out.append((i, asked, listed))
    return out


def check_absent_not_denied(view: "SampleView", env: "CheckEnv") -> str | None:
    """Negative split: every question asks about an absent object... and its answer denies that object."""
    if view.split != "negative":
        return None
    answers = view.answers
    per_question = asked_absent(view, env)
    if not any(asked for _, asked, _ in per_question):
        if not view.absent_objects and view.record is None:
            return None  # nothing known to check against
        return "no question asks about an absent object"
    for i, asked, _ in per_question:
        if i >= len(answers):
            break
        for category in sorted(asked):
            ok, why = answer_denies(answers[i], category, env.matcher)
            if not ok:
                return f"answer {i + 1} does not deny {category!r} (asked in question {i + 1}): {why}"
    return None


def check_absent_object_named(view: "SampleView", env: "CheckEnv") -> str | None:
    """Negative split: no answer names an absent object other than the one its question asked about."""
    if view.split != "negative":
        return None
    answers = view.answers
    for i, asked, listed in asked_absent(view, env):
        if i >= len(answers):
            break
        named = {m.category for m in env.matcher.mentions(answers[i])}
        others = sorted((named & listed) - asked)
        if others:
            return f"answer {i + 1} names absent object(s) {', '.join(others)} it was not asked about"
    return None
