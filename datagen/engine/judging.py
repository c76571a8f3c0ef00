"""Where a task judges its completions: in the recording thread, or in a worker process.

Parsing and the quality checks cost more CPU per sample than the HTTP request itself; in a thread
they hold the GIL against the event loop. `ProcessJudge` runs them in a separate process, so at high
concurrency the event loop keeps the requests flowing while another core checks.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from datagen.backends.base import Completion
from datagen.engine.heap import settle_worker


class JudgingTask(Protocol):
    """A task as the judge sees it (datagen.task.LlavaTask): picklable, with a pure `judge`."""

    def judge(self, subject: Any, completion: Completion) -> Any: ...


class PendingVerdicts(Protocol):
    """The verdicts of one submitted batch, in its order, once they are reached."""

    def done(self) -> bool: ...

    def result(self) -> list[Any]: ...


@dataclass(frozen=True)
class Ready:
    """Verdicts reached already (judged in the calling thread, or on the workers that sent them)."""

    verdicts: list[Any]

    def done(self) -> bool:
        return True

    def result(self) -> list[Any]:
        return self.verdicts


@dataclass(frozen=True)
class _Parts:
    """Verdicts being reached by worker processes, one contiguous part of the batch each."""

    parts: list[Future]

    def done(self) -> bool:
        return all(part.done() for part in self.parts)

    def result(self) -> list[Any]:
        return [verdict for part in self.parts for verdict in part.result()]


class Judge(Protocol):
    """Turns (subject, completion) pairs into verdicts, in order: at once (`judge_many`), or while the caller
    goes on (`submit`)."""

    def judge_many(self, pairs: list[tuple[Any, Completion]]) -> list[Any]: ...

    def submit(self, pairs: list[tuple[Any, Completion]]) -> PendingVerdicts: ...

    def close(self) -> None: ...


class InlineJudge:
    """Judges in the calling thread (small runs, slow backends, and tests)."""

    def __init__(self, task: JudgingTask) -> None:
        self.task = task

    def judge_many(self, pairs: list[tuple[Any, Completion]]) -> list[Any]:
        return [self.task.judge(subject, completion) for subject, completion in pairs]

    def submit(self, pairs: list[tuple[Any, Completion]]) -> PendingVerdicts:
        return Ready(self.judge_many(pairs))

    def close(self) -> None:
        return None


class _WorkerTask:
    """The task of this worker process, installed once by the pool's initializer (one per process by design)."""

    task: JudgingTask | None = None


def _install(task: JudgingTask) -> None:
    settle_worker()  # the inherited heap frozen, the collector run less often (datagen.engine.heap)
    _WorkerTask.task = task


def _judge_many(pairs: list[tuple[Any, Completion]]) -> list[Any]:
    task = _WorkerTask.task
    return [task.judge(subject, completion) for subject, completion in pairs]


def _ready() -> None:
    return None


class ProcessJudge:
    """Judges in worker processes; subjects go there without their chat messages (see Subject).

    The workers are forked (they start at once, with the task's modules already imported) when it is
    made, which callers do before starting threads, sockets or SQLite connections of their own
    (see executors.local.run_local); they only ever run `task.judge`. A batch is cut into one contiguous
    part per worker and the verdicts come back in the batch's order.
    """

    def __init__(self, task: JudgingTask, workers: int = 1) -> None:
        context = multiprocessing.get_context("fork")
        self.workers = max(1, workers)
        self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_install, initargs=(task,))
        # Start the workers now, while the first requests are in flight.
        self.warm: list[Future] = [self.pool.submit(_ready) for _ in range(self.workers)]

    def judge_many(self, pairs: list[tuple[Any, Completion]]) -> list[Any]:
        return self.submit(pairs).result()

    def submit(self, pairs: list[tuple[Any, Completion]]) -> PendingVerdicts:
        """Send the batch to the workers and return at once; the caller collects the verdicts when they are done."""
        if not pairs:
            return Ready([])
        slim = [(getattr(subject, "subject", subject), completion) for subject, completion in pairs]
        size = -(-len(slim) // self.workers)
        return _Parts([self.pool.submit(_judge_many, slim[start:start + size]) for start in range(0, len(slim), size)])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
