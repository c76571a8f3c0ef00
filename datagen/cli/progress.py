"""Progress of a generation run on stderr: a bar per split on a terminal, plain periodic lines otherwise.

Piped to a file or a CI log, a redrawn bar is one unreadable line at the end; plain lines
(`progress: conversation 3/4 done, 1 rejected, 812 tokens, 45 s`) say at once that the run is alive.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from datagen.engine.work import RunStats

ProgressFn = Callable[[RunStats], None]
# Plain lines: at most one per split per this many seconds, plus one when a split finishes.
PLAIN_INTERVAL_S = 10.0


def format_usd(value: float | None) -> str:
    return "n/a" if value is None else (f"${value:.4f}" if value < 1 else f"${value:,.2f}")


class PlainProgress:
    """Writes a `progress:` line per split when `interval_s` passed since its last one, and when it finishes."""

    def __init__(self, totals: dict[str, int], stream: TextIO, interval_s: float = PLAIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.totals = totals
        self.stream = stream
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.last: dict[str, float] = {split: self.started for split in totals}
        self.finished: set[str] = set()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def callback(self, split: str) -> ProgressFn:
        return lambda stats: self.update(split, stats)

    def update(self, split: str, stats: RunStats) -> None:
        now, total = self.clock(), self.totals[split]
        done = stats.processed >= total
        if split in self.finished or (not done and now - self.last[split] < self.interval_s):
            return
        if done:
            self.finished.add(split)
        self.last[split] = now
        self.stream.write(self.line(split, stats, now - self.started) + "\n")
        self.stream.flush()

    def line(self, split: str, stats: RunStats, elapsed_s: float) -> str:
        parts = [f"progress: {split} {stats.processed}/{self.totals[split]} done", f"{stats.rejected} rejected"]
        if stats.failed:
            parts.append(f"{stats.failed} failed")
        if stats.skipped:
            parts.append(f"{stats.skipped} already done")
        parts.append(f"{stats.prompt_tokens + stats.completion_tokens} tokens")
        if stats.cost_usd:
            parts.append(f"cost {format_usd(stats.cost_usd)}")
        return ", ".join(parts) + f", {elapsed_s:.0f} s"


class BarProgress:
    """One rich bar per split (done/total, rate, ETA, tokens, cost, outcomes), drawn on stderr."""

    def __init__(self, totals: dict[str, int], console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("tok {task.fields[tok]} cost {task.fields[cost]} ok {task.fields[ok]} rej {task.fields[rej]} "
                       "fail {task.fields[fail]} cached {task.fields[cached]}"),
            console=console, transient=False,
        )
        self.tasks = {split: self.progress.add_task(split, total=total, ok=0, rej=0, fail=0, tok=0, cost="$0",
                                                    rate="0.0", cached=0)
                      for split, total in totals.items()}
        self.started = time.monotonic()

    def __enter__(self) -> "BarProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def callback(self, split: str) -> ProgressFn:
        task = self.tasks[split]

        def on_progress(stats: RunStats) -> None:
            worked = stats.processed - stats.skipped
            rate = worked / max(time.monotonic() - self.started, 1e-6)
            self.progress.update(task, completed=stats.processed, ok=stats.accepted, rej=stats.rejected,
                                 fail=stats.failed, tok=stats.prompt_tokens + stats.completion_tokens,
                                 cost=format_usd(stats.cost_usd), rate=f"{rate:.1f}", cached=stats.cache_hits)

        return on_progress


def run_progress(totals: dict[str, int], stream: TextIO | None = None) -> PlainProgress | BarProgress:
    """Bars when `stream` (default stderr) is a terminal, else plain periodic lines."""
    stream = stream or sys.stderr
    if stream.isatty():
        return BarProgress(totals, Console(file=stream))
    return PlainProgress(totals, stream)
