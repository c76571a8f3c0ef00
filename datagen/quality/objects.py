"""COCO object mentions in free text (synonyms, plurals, negation) and CHAIR hallucination counts."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from datagen.coco import ImageRecord
from datagen.quality.words import tokens

_CLAUSE_END = frozenset(".,;:!?()\"")
NEGATORS = frozenset({"no", "not", "without", "nor", "neither", "never", "none"})
NEGATION_WINDOW = 4
# After an ambiguous word ("orange", "remote", "tie") these keep it a noun: "an orange on the plate".
NOUN_FOLLOWERS = frozenset(
    "and or with is are was were on in at of near next beside behind under over by that which sitting lying "
    "sits lies placed from to for nearby there here as has have can could appears seems being slices slice "
    "wedges halves".split()
)
# Before an ambiguous word these make it an adjective: "the cat is orange", "bright orange".
ADJECTIVE_LEADS = frozenset("is are was were looks look appears seems colored coloured painted bright dark light pale".split())
# An object named after one of these in the same sentence is supposed, not asserted ("someone might
# use the laptop to ..."): reasoning answers are full of such talk, and CHAIR counts assertions.
HEDGES = frozenset("might may could would should if perhaps possibly probably likely maybe suggests suggest suggesting whether".split())
_SENTENCE_END = frozenset(".!?")
_TEXT_BREAK = "."  # a clause and sentence end: what separates texts scanned together
COLOURS = frozenset("white black red blue green yellow brown gray grey pink purple orange silver gold tan beige".split())


def tokenize(text: str) -> list[str]:
    """Lower-case word and clause-punctuation tokens; "isn't" becomes "is not", hyphens split words."""
    # Tokens: words, numbers, and the punctuation that ends a clause (negation does not cross it).
    return tokens(text.lower().replace("n't", " not").replace("-", " "))


def plural(word: str) -> str:
    """Regular English plural of one word (irregular ones are listed in the synonym table)."""
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


@dataclass(frozen=True)
class Mention:
    """One object word in a text: its COCO category, the words matched, and whether it is negated."""

    category: str
    phrase: str
    negated: bool
    hedged: bool = False


class ObjectMatcher:
    """Finds COCO categories named in text, longest phrase first ("hot dog" is not a dog)."""

    def __init__(self, categories: dict[str, list[str]], ambiguous: list[str], not_objects: list[str]) -> None:
        # phrase tokens -> category, or None for phrases that name no object ("bus stop").
        self.phrases: dict[tuple[str, ...], str | None] = {}
        for category, names in categories.items():
            for name in [category, *names]:
                words = tuple(tokenize(name))
                self.phrases.setdefault(words, category)
                self.phrases.setdefault(words[:-1] + (plural(words[-1]),), category)
        for name in not_objects:
            words = tuple(tokenize(name))
            self.phrases[words] = None
            self.phrases[words[:-1] + (plural(words[-1]),)] = None
        self.ambiguous = {tuple(tokenize(name)) for name in ambiguous}
        self.max_len = max(len(p) for p in self.phrases)
        self.category_names = sorted(categories)
        # First word -> the lengths of the phrases starting with it, longest first: most words start none,
        # so `mentions` looks each word up once instead of building a tuple per candidate length.
        lengths: dict[str, set[int]] = {}
        for key in self.phrases:
            if key:
                lengths.setdefault(key[0], set()).add(len(key))
        self._lengths_by_first: dict[str, tuple[int, ...]] = {w: tuple(sorted(ls, reverse=True)) for w, ls in lengths.items()}
        # Texts joined by a lone "." read like separate texts (negation, hedges and the ambiguous-word rules
        # all stop at it) unless some phrase itself spans a "." token.
        self._dot_joins = not any(_TEXT_BREAK in key for key in self.phrases)
        # Clause-end tokens no phrase contains: a text that ends on one cannot share a phrase, or any of the
        # ambiguous-word rules, with the text after it (see `scan_joined`).
        self._breaks = frozenset(t for t in _CLAUSE_END if not any(t in key for key in self.phrases))
        self._scans: dict[str, tuple[list[str], list[tuple[int, tuple[str, ...], str]]]] = {}

    SCAN_CACHE_SIZE = 4096

    def phrases_in(self, tokens: list[str]) -> list[tuple[int, tuple[str, ...], str]]:
        """(start, phrase tokens, category) of each object phrase in already tokenized text."""
        return self._found(tokens)

    def scan(self, text: str) -> tuple[list[str], list[tuple[int, tuple[str, ...], str]]]:
        """(tokens, object phrases found) of a text; remembered, since several checks read the same answers."""
        cache = self._scans
        hit = cache.get(text)
        if hit is None:
            if len(cache) >= self.SCAN_CACHE_SIZE:
                cache.clear()
            tokens = tokenize(text)
            hit = cache[text] = (tokens, self._found(tokens))
        return hit

    def scan_joined(self, texts: list[str], sep: str = "\n") -> tuple[list[str], list[tuple[int, tuple[str, ...], str]]]:
        """`scan(sep.join(texts))`, assembled from the scans of the texts where that gives the same result (the checks
        read each answer alone and all answers together: one tokenization and one phrase search serve both).

        With a whitespace `sep` (anything else is scanned joined) the joined text's tokens are the texts' tokens one
        after the other. Its phrases are theirs, shifted, when every text followed by another ends on a clause-end
        token that no phrase contains: no phrase can span it, and the ambiguous-word rules read it as they read the
        end or start of a text (a clause end, neither a lead word nor "and"/"or"). Otherwise the joined text is
        scanned itself. tests/test_quality_speed_equivalence.py pins this.
        """
        joined = sep.join(texts)
        hit = self._scans.get(joined)
        if hit is not None:
            return hit
        if not sep.isspace():
            return self.scan(joined)
        tokens: list[str] = []
        found: list[tuple[int, tuple[str, ...], str]] = []
        breaks = self._breaks
        for text in texts:
            if tokens and tokens[-1] not in breaks:
                return self.scan(joined)
            part_tokens, part_found = self.scan(text)
            offset = len(tokens)
            tokens += part_tokens
            found += [(i + offset, key, category) for i, key, category in part_found] if offset else part_found
        cache = self._scans
        if len(cache) >= self.SCAN_CACHE_SIZE:
            cache.clear()
        hit = cache[joined] = (tokens, found)
        return hit

    @classmethod
    def from_file(cls, path: Path) -> "ObjectMatcher":
        """Load a synonym table in the format of coco_synonyms.json."""
        table = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(table["categories"], table.get("ambiguous", []), table.get("not_objects", []))

    def _is_noun_use(self, tokens: list[str], start: int, end: int) -> bool:
        """For ambiguous words: keep "an orange on the table", drop "an orange shirt" and "orange and white"."""
        nxt = tokens[end] if end < len(tokens) else "."
        after = tokens[end + 1] if end + 1 < len(tokens) else "."
        prev = tokens[start - 1] if start > 0 else "."
        before = tokens[start - 2] if start > 1 else "."
        if prev in ADJECTIVE_LEADS:
            return False
        if nxt in ("and", "or") and after in COLOURS or prev in ("and", "or") and before in COLOURS:
            return False
        return nxt in _CLAUSE_END or nxt in NOUN_FOLLOWERS

    def _found(self, tokens: list[str]) -> list[tuple[int, tuple[str, ...], str]]:
        """(start, phrase tokens, category) of each object phrase, longest first, left to right."""
        n = len(tokens)
        phrases, by_first, ambiguous = self.phrases, self._lengths_by_first, self.ambiguous
        found: list[tuple[int, tuple[str, ...], str]] = []
        free = 0  # tokens before this index belong to a phrase already matched
        for i in [i for i, token in enumerate(tokens) if token in by_first]:
            if i < free:
                continue
            for length in by_first[tokens[i]]:
                if length > n - i:
                    continue
                key = tuple(tokens[i : i + length])
                if key not in phrases:
                    continue
                category = phrases[key]
                if category is not None and (key not in ambiguous or self._is_noun_use(tokens, i, i + length)):
                    found.append((i, key, category))
                free = i + length
                break
        return found

    def mentions(self, text: str) -> list[Mention]:
        """Every object mention in reading order."""
        tokens = tokenize(text)
        return [
            Mention(category, " ".join(key), self._negated(tokens, i), self._hedged(tokens, i))
            for i, key, category in self._found(tokens)
        ]

    @staticmethod
    def _negated(tokens: list[str], start: int) -> bool:
        """A negator within a few words before, in the same clause: "there is no dog"."""
        for j in range(start - 1, max(-1, start - 1 - NEGATION_WINDOW), -1):
            if tokens[j] in _CLAUSE_END:
                return False
            if tokens[j] in NEGATORS:
                return True
        return False

    @staticmethod
    def _hedged(tokens: list[str], start: int) -> bool:
        """A hedge word earlier in the same sentence."""
        for j in range(start - 1, -1, -1):
            if tokens[j] in _SENTENCE_END:
                return False
            if tokens[j] in HEDGES:
                return True
        return False

    def categories(self, text: str, include_hedged: bool = True) -> set[str]:
        """Categories named and not negated in the text (optionally also not hedged)."""
        tokens, found = self.scan(text)  # the checks ask about the same answers more than once
        named: set[str] = set()
        for i, _, category in found:
            # the same set as from `mentions`, without building them or re-testing a category already in
            if category not in named and not self._negated(tokens, i) and (include_hedged or not self._hedged(tokens, i)):
                named.add(category)
        return named

    def categories_of_each(self, texts: list[str], include_hedged: bool = True) -> set[str]:
        """The union of `categories` over several texts (one scan where they can be joined)."""
        if self._dot_joins:
            return self.categories(f" {_TEXT_BREAK} ".join(texts), include_hedged)
        found: set[str] = set()
        for text in texts:
            found |= self.categories(text, include_hedged)
        return found


@lru_cache(maxsize=1)
def default_matcher() -> ObjectMatcher:
    """The matcher built from the synonym table shipped with the package."""
    path = resources.files("datagen.quality").joinpath("coco_synonyms.json")
    return ObjectMatcher.from_file(Path(str(path)))


def ground_truth(record: ImageRecord, matcher: ObjectMatcher) -> set[str]:
    """Categories the image is known to contain: its boxes plus what its captions name."""
    return {obj.category for obj in record.objects} | matcher.categories_of_each(list(record.captions))


def not_in_image(record: ImageRecord, categories: set[str], matcher: ObjectMatcher,
                 truth: Callable[[], set[str]] | None = None) -> set[str]:
    """`categories - ground_truth(record, matcher)`, reading the captions only for categories without a box (which
    most answers never name). `truth`: the image's ground truth when the caller remembers it."""
    unboxed = categories - {obj.category for obj in record.objects}
    if not unboxed:
        return unboxed
    return unboxed - (truth() if truth is not None else ground_truth(record, matcher))


@dataclass
class ChairCounter:
    """CHAIR over a set of samples: CHAIR_i = hallucinated / mentioned objects, CHAIR_s = samples with one."""

    mentioned: int = 0
    hallucinated: int = 0
    samples: int = 0
    samples_hallucinating: int = 0

    def add(self, mentioned: set[str], hallucinated: set[str]) -> None:
        """Count one sample's distinct mentioned and hallucinated categories."""
        self.samples += 1
        self.mentioned += len(mentioned)
        self.hallucinated += len(hallucinated)
        self.samples_hallucinating += bool(hallucinated)

    @property
    def chair_i(self) -> float | None:
        return self.hallucinated / self.mentioned if self.mentioned else None

    @property
    def chair_s(self) -> float | None:
        return self.samples_hallucinating / self.samples if self.samples else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "samples": self.samples, "objects_mentioned": self.mentioned, "objects_hallucinated": self.hallucinated,
            "samples_hallucinating": self.samples_hallucinating, "chair_i": self.chair_i, "chair_s": self.chair_s,
        }
