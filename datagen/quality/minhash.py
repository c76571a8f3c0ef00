"""Near-duplicate text detection: word n-gram shingles, MinHash signatures, LSH buckets."""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_PRIME = (1 << 31) - 1  # hashes are 32-bit and multipliers < 2^31, so a*h + b fits in uint64
_HASH_CACHE_SIZE = 1 << 16  # shingle hashes kept per MinHasher


def shingles(text: str, size: int) -> set[str]:
    """Word n-grams of the lower-cased text; a text shorter than n words is one shingle."""
    words = _WORD.findall(text.lower())
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

    def hashes(self, items: set[str]) -> np.ndarray:
        """The 32-bit blake2b hash of each item, in the set's iteration order."""
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
        """Per hash function, the minimum over the items (all-max for an empty set)."""
        if not items:
            return np.full(self.num_perm, _PRIME, dtype=np.uint64)
        values = np.multiply.outer(self.hashes(items), self.a)
        values += self.b
        np.remainder(values, _PRIME, out=values)
        return values.min(axis=0)


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
        self.buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        self.keys: list[str] = []
        # Signatures as rows of one growing matrix, so candidates are compared in one numpy step.
        self.signatures = np.empty((64, num_perm), dtype=np.uint64)
        self._last_bands: tuple[bytes, list[tuple[int, bytes]]] | None = None

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature of the text's shingles."""
        return self.hasher.signature(shingles(text, self.shingle_size))

    def _bands(self, sig: np.ndarray) -> list[tuple[int, bytes]]:
        raw = np.ascontiguousarray(sig).tobytes()
        last = self._last_bands
        if last is not None and last[0] == raw:
            return last[1]  # `insert` after `match` of the same signature
        width = self.rows * sig.itemsize
        bands = [(b, raw[b * width : (b + 1) * width]) for b in range(len(sig) // self.rows)]
        self._last_bands = (raw, bands)
        return bands

    def match(self, sig: np.ndarray) -> tuple[str, float] | None:
        """The most similar remembered text at or above the threshold: (key, estimated Jaccard)."""
        candidates: set[int] = set()
        for band in self._bands(sig):
            candidates.update(self.buckets.get(band, ()))
        if not candidates:
            return None
        rows = np.fromiter(sorted(candidates), dtype=np.int64, count=len(candidates))
        similarity = (self.signatures[rows] == sig).mean(axis=1)
        best = int(np.argmax(similarity))  # first of the most similar: the earliest sample wins ties
        if similarity[best] < self.threshold:
            return None
        return self.keys[rows[best]], float(similarity[best])

    def insert(self, key: str, sig: np.ndarray) -> None:
        """Remember a signature under a key."""
        index = len(self.keys)
        if index == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[index] = sig
        self.keys.append(key)
        for band in self._bands(sig):
            self.buckets[band].append(index)

    def add(self, key: str, text: str) -> tuple[str, float] | None:
        """Check `text` against earlier ones, then remember it; returns (earlier key, similarity) or None."""
        sig = self.signature(text)
        found = self.match(sig)
        self.insert(key, sig)
        return found
