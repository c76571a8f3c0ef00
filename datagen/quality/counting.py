"""Checks that count and place: "three dogs" against the boxes, "the cat left of the dog" against box centres."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datagen.coco import ImageRecord
from datagen.quality.generic import is_generic
from datagen.quality.objects import ObjectMatcher

if TYPE_CHECKING:  # the check registry imports this module; the types are for reading only
    from datagen.quality.view import CheckEnv, SampleView

NUMBER_WORDS: dict[str, int] = {
    w: n for n, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split())
} | {"both": 2, "pair": 2, "dozen": 12, "single": 1, "lone": 1}
# Plural quantities without a number: the boxes must hold at least two.
# ("many" is left out: "many birds eat fruit" is talk about birds in general far more often than a count.)
VAGUE_PLURAL = frozenset("several few couple multiple numerous various group groups bunch lots".split())
# Quantity nouns read through "of": "a pair of dogs".
_OF_QUANTITIES = frozenset("pair couple dozen group groups bunch lots few".split())
# Words that may stand between a number and its object ("three small brown dogs") without breaking the claim.
_NOT_MODIFIERS = frozenset(
    "the a an of and or with in on at to from by for as is are was were that which who this these those their "
    "his her its our your my other others another more than".split()
)
MAX_MODIFIERS = 3
# Before a number, these make it a claim about the whole image ("there are two dogs"), not about a subset
# ("two dogs are sleeping while a third plays"): only such claims are checked for counting too few.
_TOTAL_CUES = frozenset("there see seen shows show showing features featuring contains containing includes including "
                        "total all only exactly just".split())
_CLAUSE_END = frozenset(".,;:!?()\"")


@dataclass(frozen=True)
class CountClaim:
    """A number attached to an object: "three dogs" -> (dog, 3); "several dogs" -> (dog, None)."""

    category: str
    count: int | None
    phrase: str
    whole: bool  # phrased as the total in the image


def count_claims(text: str, matcher: ObjectMatcher) -> list[CountClaim]:
    """Every number word, digit or vague plural quantity attached to an object mention."""
    tokens, found = matcher.scan(text)
    claims = []
    for start, key, category in found:
        j = start - 1
        skipped = 0
        if j >= 1 and tokens[j] == "of" and tokens[j - 1] in _OF_QUANTITIES:
            j -= 1  # "a pair of dogs", "a couple of dogs", "a group of people"
        while j >= 0 and skipped < MAX_MODIFIERS and tokens[j] not in NUMBER_WORDS and not tokens[j].isdigit() \
                and tokens[j] not in VAGUE_PLURAL and tokens[j] not in _NOT_MODIFIERS and tokens[j] not in _CLAUSE_END:
            j -= 1
            skipped += 1
        if j < 0:
            continue
        word = tokens[j]
        if word == "one" and j + 1 < len(tokens) and tokens[j + 1] == "of":
            continue
        if word.isdigit():
            count: int | None = int(word)
        elif word in NUMBER_WORDS:
            count = NUMBER_WORDS[word]
        elif word in VAGUE_PLURAL:
            count = None
        else:
            continue
        if is_generic(tokens, start, start + len(key), category):
            continue  # "a table for two people" counts no one in the picture
        lead = tokens[max(0, j - 3):j]
        whole = any(t in _TOTAL_CUES for t in lead) and not any(t in _CLAUSE_END for t in lead)
        claims.append(CountClaim(category, count, " ".join(tokens[j:start + len(key)]), whole))
    return claims


def box_counts(record: ImageRecord) -> tuple[Counter, set[str]]:
    """(boxes per category not counting crowd boxes, categories with a crowd box)."""
    counts: Counter = Counter()
    crowd: set[str] = set()
    for obj in record.objects:
        if obj.iscrowd:
            crowd.add(obj.category)
        else:
            counts[obj.category] += 1
    return counts, crowd


def count_problem(claim: CountClaim, boxes: int, crowd: bool) -> str | None:
    """Why a claim contradicts the boxes, or None (crowd boxes are tolerated; so is a count the captions state, which
    `check_wrong_count` looks up only for a claim this refuses)."""
    if claim.count is None:
        if boxes + crowd >= 2:
            return None
        return f"{claim.phrase!r} but the image has {boxes} {claim.category} box"
    n = claim.count
    if n == boxes:
        return None
    if n > boxes:
        if crowd:
            return None  # a crowd box holds an unknown number
        return f"{claim.phrase!r} but the image has {boxes} {claim.category} box{'es' if boxes != 1 else ''}"
    if claim.whole:
        return f"{claim.phrase!r} but the image has {boxes} {claim.category} boxes"
    return None


def check_wrong_count(view: "SampleView", env: "CheckEnv") -> str | None:
    """A number attached to a boxed object in an answer agrees with its box count (crowds, captions tolerated)."""
    record = view.record
    if record is None or not record.objects:
        return None
    counts, crowd = box_counts(record)
    for i, answer in enumerate(view.answers):
        for claim in count_claims(answer, env.matcher):
            boxes = counts.get(claim.category, 0)
            if boxes == 0 and claim.category not in crowd:
                continue  # not boxed: whether it is there at all is the object check's question
            problem = count_problem(claim, boxes, claim.category in crowd)
            if problem and (claim.count is None or (claim.category, claim.count) not in _caption_counts(record, env)):
                return f"answer {i + 1}: {problem}"
    return None


def _caption_counts(record: ImageRecord, env: "CheckEnv") -> set[tuple[str, int]]:
    """(category, number) the captions state; read once per sample, and only when the boxes alone refuse a count
    (most samples make no such claim)."""
    key = ("caption_counts",)
    if key not in env.memo:
        env.memo[key] = {(c.category, c.count) for cap in record.captions for c in count_claims(cap, env.matcher)
                         if c.count is not None}
    return env.memo[key]


# --- placement ---------------------------------------------------------------------------------

# Relation phrases (token tuples) -> which way the first object lies from the second.
RELATIONS: dict[tuple[str, ...], str] = {}
for _side in ("left", "right"):
    for _phrase in (f"to the {_side} of", f"on the {_side} of", f"{_side} of", f"on the {_side} side of",
                    f"to the {_side} side of", f"at the {_side} of"):
        RELATIONS[tuple(_phrase.split())] = _side
for _phrase in ("above", "on top of", "atop"):
    RELATIONS[tuple(_phrase.split())] = "above"
for _phrase in ("below", "beneath", "under", "underneath"):
    RELATIONS[tuple(_phrase.split())] = "below"
_MAX_RELATION = max(len(k) for k in RELATIONS)
_RELATION_FIRST_WORDS = frozenset(k[0] for k in RELATIONS)
_SENTENCE_STOPS = frozenset(".!?;:")
OBJECT_WINDOW = 4
# How far (in image widths/heights) the centres must lie the wrong way round before a claim is refused.
POSITION_MARGIN = 0.05


@dataclass(frozen=True)
class PositionClaim:
    """"<first> <relation> <second>", e.g. (cat, left, dog)."""

    first: str
    relation: str
    second: str
    phrase: str


def position_claims(text: str, matcher: ObjectMatcher) -> list[PositionClaim]:
    """Relations between two named objects in the same clause."""
    tokens, found = matcher.scan(text)
    if not found or not _RELATION_FIRST_WORDS.intersection(tokens):
        return []  # a claim needs an object before its relation word
    claims = []
    free = 0  # tokens before this index belong to a relation already read
    # Only the words a relation can start with are looked at, left to right (the rest move on by one word).
    for i in [i for i, token in enumerate(tokens) if token in _RELATION_FIRST_WORDS]:
        if i < free:
            continue
        relation = None
        for length in range(_MAX_RELATION, 0, -1):
            key = tuple(tokens[i:i + length])
            if key in RELATIONS:
                relation = RELATIONS[key]
                break
        if relation is None:
            continue
        free = i + length
        # The subject: the one kind of object named earlier in the sentence (two kinds make it ambiguous:
        # "the cup next to the plate is left of the laptop" is not checked).
        stop = next((j for j in range(i - 1, -1, -1) if tokens[j] in _SENTENCE_STOPS), -1)  # the sentence's start
        before = [(s, k, c) for s, k, c in found if stop < s + len(k) <= i]
        after = [(s, k, c) for s, k, c in found if s >= i + length and s - (i + length) <= OBJECT_WINDOW
                 and not any(t in _CLAUSE_END for t in tokens[i + length:s])]
        if before and after and len({c for _, _, c in before}) == 1:
            first, second = before[-1], after[0]
            if first[2] != second[2]:
                phrase = " ".join(tokens[first[0]:second[0] + len(second[1])])
                claims.append(PositionClaim(first[2], relation, second[2], phrase))
    return claims


def _centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    x, y, w, h = box
    return x + w / 2, y + h / 2


def position_problem(claim: PositionClaim, record: ImageRecord) -> str | None:
    """Why the claim contradicts the centres of the two objects' boxes (each unique in the image), or None."""
    boxes = {c: [o for o in record.objects if o.category == c] for c in (claim.first, claim.second)}
    if any(len(b) != 1 or b[0].iscrowd for b in boxes.values()):
        return None  # "the dog" is ambiguous among several dogs
    (ax, ay), (bx, by) = (_centre(boxes[c][0].bbox) for c in (claim.first, claim.second))
    dx, dy = (ax - bx) / record.width, (ay - by) / record.height
    wrong = {"left": dx > POSITION_MARGIN, "right": -dx > POSITION_MARGIN,
             "above": dy > POSITION_MARGIN, "below": -dy > POSITION_MARGIN}[claim.relation]
    if not wrong:
        return None
    return f"{claim.phrase!r} but the {claim.first}'s centre is {'right' if dx > 0 else 'left'} of and " \
           f"{'below' if dy > 0 else 'above'} the {claim.second}'s"


def check_wrong_position(view: "SampleView", env: "CheckEnv") -> str | None:
    """Left/right/above/below claims about two objects, each boxed once, agree with their box centres."""
    record = view.record
    if record is None or not record.objects:
        return None
    for i, answer in enumerate(view.answers):
        for claim in position_claims(answer, env.matcher):
            problem = position_problem(claim, record)
            if problem:
                return f"answer {i + 1}: {problem}"
    return None
