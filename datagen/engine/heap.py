"""The cyclic garbage collector's settings while a run judges and writes samples.

A run allocates a few hundred short-lived containers per sample (parsed turns, check results, JSON
lines), and CPython collects its youngest generation every 700 of them, each time also looking at
whatever survived; every tenth collection scans the older generation too, and now and then the whole
heap, including the tens of thousands of objects (modules, the synonym table, the run's records) that
were alive before the run started and stay alive after it. Measured on `make bench-datagen`'s samples at
concurrency 256 (bench/RESULTS.md, issue 8): the collector took ~0.15 ms of CPU per sample across the
main process and the judge processes, next to ~1.1 ms for everything.

`steady_heap` freezes what exists when a run starts (the collector no longer scans it; forked judge
processes then also leave those pages unwritten) and collects the youngest generation after
GEN0_THRESHOLD new containers. Reference counting still frees everything that is not in a cycle at
once, so memory stays flat; cycles wait a little longer.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

GEN0_THRESHOLD = 50_000


def settle_worker() -> None:
    """In a worker process that only judges: freeze what it inherited and collect less often (for its lifetime)."""
    gc.freeze()
    gc.set_threshold(*_fewer_collections(gc.get_threshold()))


def _fewer_collections(threshold: tuple[int, int, int]) -> tuple[int, int, int]:
    """The thresholds with the youngest generation's raised to GEN0_THRESHOLD (0, automatic collection off, stays)."""
    youngest, older, oldest = threshold
    return (max(GEN0_THRESHOLD, youngest) if youngest else 0), older, oldest


@contextmanager
def steady_heap() -> Iterator[None]:
    """For the duration of a run: the objects alive at its start frozen, the youngest generation collected after
    GEN0_THRESHOLD new containers; the collector's settings as they were afterwards."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*_fewer_collections(before))
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
