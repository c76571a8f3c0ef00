"""Near-duplicate text detection: word n-gram shingles, MinHash signatures, LSH buckets."""
from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections import Counter
from itertools import chain, repeat

import numpy as np

from datagen.quality.words import words as lower_words

_PRIME = (1 << 31) - 1  # hashes are 32-bit and multipliers < 2^31, so a*h + b fits in uint64
_P64 = np.uint64(_PRIME)
_HASH_CACHE_SIZE = 1 << 16  # shingle hashes kept per MinHasher
# Shingles whose values under every hash function are kept per MinHasher (num_perm uint32 each: 8 MB at 128).
_ROW_CACHE_SIZE = 1 << 14
_NO_ROWS: dict[str, int] = {}  # a first word with no pair kept (read only)
_BAND_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it modulo 2^64 loses no bits


def shingles(text: str, size: int) -> set[str]:
    """Word n-grams of the lower-cased text; a text shorter than n words is one shingle."""
    words = lower_words(text.lower())
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    # zip of the shifted word lists: the n-grams at every start, without slicing per start
    return set(map(" ".join, zip(*(words[i:] for i in range(size)))))


def jaccard(a: set[str], b: set[str]) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


class MinHasher:
    """Deterministic MinHash: `num_perm` universal hash functions over 32-bit shingle hashes."""

    def __init__(self, num_perm: int = 128, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm
        # Shingle -> its 32-bit hash: word pairs recur across texts, so most are hashed once per run.
        self._hashes: dict[str, int] = {}
        # Shingle -> its row in `_rows`: its value under each hash function, computed once while it is kept. A text's
        # signature is then the minimum over its shingles' rows (the same numbers as computing them again).
        self._row_of: dict[str, int] = {}
        self._rows = np.empty((0, num_perm), dtype=np.uint32)
        # The same rows by the two words of a 2-word shingle (first word -> second word -> row), so `pair_signature`
        # looks a pair up without joining it into a string; emptied with `_row_of`.
        self._pair_row: dict[str, dict[str, int]] = {}

    def hashes(self, items: set[str] | list[str]) -> np.ndarray:
        """The 32-bit blake2b hash of each item, in their iteration order."""
        cache = self._hashes
        missing = [s for s in items if s not in cache]
        if missing:
            if len(cache) + len(missing) > _HASH_CACHE_SIZE:
                cache.clear()  # bounded memory; a long run just rehashes what comes next
                missing = list(items)
            # blake2b, not hash(): Python's str hash changes per process and results must be reproducible.
            for s in missing:
                cache[s] = int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")
        return np.fromiter(map(cache.__getitem__, items), dtype=np.uint64, count=len(items))

    def signature(self, items: set[str]) -> np.ndarray:
        """Per hash function, the minimum over the items (all-max for an empty set); uint32 (values < 2^31)."""
        if not items:
            return np.full(self.num_perm, _PRIME, dtype=np.uint32)
        row_of = self._row_of
        missing = [s for s in items if s not in row_of]
        if missing:
            if len(row_of) + len(missing) > _ROW_CACHE_SIZE:
                row_of.clear()  # bounded memory, as for the hashes
                self._pair_row.clear()
                missing = list(items)
            self._add_rows(missing)
        rows = np.fromiter(map(row_of.__getitem__, items), dtype=np.intp, count=len(items))
        return self._rows.take(rows, axis=0).min(axis=0)

    def _add_rows(self, new: list[str]) -> None:
        """Rows for distinct items not kept yet (the caller made room for them)."""
        row_of = self._row_of
        start, end = len(row_of), len(row_of) + len(new)
        if end > len(self._rows):
            grown = np.empty((max(end, min(2 * len(self._rows), _ROW_CACHE_SIZE), 1024), self.num_perm), dtype=np.uint32)
            grown[:start] = self._rows[:start]
            self._rows = grown
        self._rows[start:end] = self.values(new)
        row_of.update(zip(new, range(start, end)))

    def pair_signature(self, words: list[str]) -> np.ndarray:
        """`signature(shingles(text, 2))` of a text of more than two words (`words`, as `shingles` reads them): the
        minimum over the rows of its adjacent word pairs (a pair seen twice gives its row twice: the same minimum)."""
        firsts, seconds = words[:-1], words[1:]
        pair_row, row_of = self._pair_row, self._row_of
        rows = list(map(dict.get, map(pair_row.get, firsts, repeat(_NO_ROWS)), seconds))
        if None in rows:
            unseen = [k for k, row in enumerate(rows) if row is None]
            names = [f"{firsts[k]} {seconds[k]}" for k in unseen]
            new = list(dict.fromkeys(name for name in names if name not in row_of))
            if len(row_of) + len(new) > _ROW_CACHE_SIZE:  # no room: the caches start again with this text
                signature = self.signature(set(map(" ".join, zip(firsts, seconds))))
                unseen, names = range(len(rows)), [f"{a} {b}" for a, b in zip(firsts, seconds)]
            else:
                signature = None
                self._add_rows(new)
            for k, name in zip(unseen, names):
                rows[k] = row = row_of[name]
                inner = pair_row.get(firsts[k])
                if inner is None:
                    inner = pair_row[firsts[k]] = {}
                inner[seconds[k]] = row
            if signature is not None:
                return signature
        return self._rows.take(np.fromiter(rows, dtype=np.intp, count=len(rows)), axis=0).min(axis=0)

    def values(self, items: list[str]) -> np.ndarray:
        """Each item's value under each hash function, (a * hash + b) mod (2^31 - 1): one uint32 row per item."""
        values = np.multiply.outer(self.hashes(items), self.a)
        values += self.b
        # A plain modulo by the one scalar: measured faster than folding the high bits by hand, 3-4x on the few rows
        # a text adds and 3x on a few hundred (bench/RESULTS.md, issue 8, second session).
        values %= _P64
        return values.astype(np.uint32)


# A bucket this large is read by membership tests rather than counted through (see `sharing`).
HOT_BUCKET = 64
# `sharing` leaves the largest buckets out of its count only while the others must still hold a candidate this
# many times: fewer would let most indices through to the membership tests.
MIN_COUNTED_SHARES = 3


def sharing(buckets: list[list[int]], need: int, hot: int = HOT_BUCKET) -> list[int]:
    """The indices found in at least `need` of the buckets (each an ascending list of distinct indices).

    Counting every index of every bucket costs what the buckets hold, and common phrasing puts a large part of all
    the texts kept into a few buckets. Those (`hot` indices or more) are left out of the count, up to
    `need - MIN_COUNTED_SHARES` of them, the largest first: an index in `need` buckets is then in at least
    `need - skipped` of the counted ones, and only the indices counted that often are looked up (bisection) in the
    buckets left out. The same indices as counting them all (tests/test_quality_speed_equivalence.py).
    """
    skip = min(need - MIN_COUNTED_SHARES, sum(1 for bucket in buckets if len(bucket) >= hot))
    if skip <= 0:
        return [i for i, shared in Counter(chain.from_iterable(buckets)).items() if shared >= need]
    by_size = sorted(buckets, key=len, reverse=True)
    left_out, counted = by_size[:skip], by_size[skip:]
    floor = need - skip
    found = []
    for index, shared in Counter(chain.from_iterable(counted)).items():
        if shared < floor:
            continue
        for bucket in left_out:
            at = bisect_left(bucket, index)
            shared += at < len(bucket) and bucket[at] == index
        if shared >= need:
            found.append(index)
    return found


class NearDuplicateIndex:
    """Remembers texts seen so far; `add` reports an earlier one whose estimated Jaccard >= threshold."""

    def __init__(self, threshold: float, shingle_size: int = 3, num_perm: int = 128, rows_per_band: int = 4) -> None:
        if num_perm % rows_per_band:
            raise ValueError("num_perm must be a multiple of rows_per_band")
        self.threshold = threshold
        self.shingle_size = shingle_size
        self.hasher = MinHasher(num_perm)
        self.rows = rows_per_band
        # Bands of 4 rows make pairs well below the threshold collide too; candidates are then verified.
        self.buckets: dict[int, list[int]] = {}
        self.keys: list[str] = []
        # Signatures as rows of one growing matrix, so candidates are compared in one numpy step.
        self.signatures = np.empty((64, num_perm), dtype=np.uint32)
        self._band_positions = np.arange(num_perm // rows_per_band, dtype=np.uint64)  # the last term of each band key
        # A signature within the threshold differs in at most num_perm - min_agree rows, each spoiling one band at
        # most: a candidate sharing fewer bands than this cannot be a match (see `match`).
        min_agree = next(a for a in range(num_perm + 1) if a / num_perm >= threshold)
        self.min_shared_bands = max(0, num_perm // rows_per_band - (num_perm - min_agree))

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature of the text's shingles."""
        if self.shingle_size == 2:
            words = lower_words(text.lower())
            if len(words) > 2:
                return self.hasher.pair_signature(words)
        return self.hasher.signature(shingles(text, self.shingle_size))

    def band_keys(self, sig: np.ndarray) -> tuple[int, ...]:
        """One 64-bit int per band: a polynomial hash of the band's rows and its position (arithmetic modulo 2^64).

        Two signatures that agree on every row of a band share its key; two that do not, only by a 64-bit collision
        (odds about 2^-64 per pair of bands), which at most adds a candidate that `match` then compares on the whole
        signatures. The same in every process (no per-process hash seed), and cheap to send.
        """
        bands = np.asarray(sig).reshape(-1, self.rows).astype(np.uint64)
        keys = bands[:, 0] * _BAND_MULTIPLIER
        for row in range(1, self.rows):
            keys += bands[:, row]
            keys *= _BAND_MULTIPLIER
        keys += self._band_positions
        return tuple(keys.tolist())

    def match(self, sig: np.ndarray, bands: tuple[int, ...] | None = None) -> tuple[str, float] | None:
        """The most similar remembered text at or above the threshold: (key, estimated Jaccard).

        `bands`: the signature's `band_keys`, when the caller has them already (a worker process computed them).
        """
        hits = [bucket for bucket in map(self.buckets.get, self.band_keys(sig) if bands is None else bands) if bucket]
        if len(hits) < max(1, self.min_shared_bands):
            return None
        if self.min_shared_bands > 1:
            # Only those sharing enough bands can reach the threshold; they include the most similar whenever it does
            # (the answer is the same, without comparing every signature that shares a band by chance).
            candidates = sharing(hits, self.min_shared_bands, HOT_BUCKET)
            if not candidates:
                return None
        else:
            candidates = set().union(*hits)
        rows = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
        agree = (self.signatures[rows] == sig).sum(axis=1)
        most = agree.max()
        similarity = float(most) / sig.shape[0]
        if similarity < self.threshold:
            return None
        best = int(rows[agree == most].min())  # the earliest of the most similar wins ties
        return self.keys[best], similarity

    def insert(self, key: str, sig: np.ndarray, bands: tuple[int, ...] | None = None) -> None:
        """Remember a signature under a key."""
        index = len(self.keys)
        if index == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[index] = sig
        self.keys.append(key)
        buckets = self.buckets  # indices only grow, so every bucket stays ascending (`sharing` bisects them)
        for band in self.band_keys(sig) if bands is None else bands:
            bucket = buckets.get(band)
            if bucket is None:
                buckets[band] = [index]
            else:
                bucket.append(index)

    def add(self, key: str, text: str) -> tuple[str, float] | None:
        """Check `text` against earlier ones, then remember it; returns (earlier key, similarity) or None."""
        sig = self.signature(text)
        found = self.match(sig)
        self.insert(key, sig)
        return found
