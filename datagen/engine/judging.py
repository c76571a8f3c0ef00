"""Where a task judges its completions: in the recording thread, or in a worker process.

Parsing and the quality checks cost more CPU per sample than the HTTP request itself; in a thread
they hold the GIL against the event loop. `ProcessJudge` runs them in a separate process, so at high
concurrency the event loop keeps the requests flowing while another core checks.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol

from datagen.backends.base import Completion


class JudgingTask(Protocol):
    """A task as the judge sees it (datagen.task.LlavaTask): picklable, with a pure `judge`."""

    def judge(self, subject: Any, completion: Completion) -> Any: ...


class Judge(Protocol):
    """Turns (subject, completion) pairs into verdicts, in order."""

    def judge_many(self, pairs: list[tuple[Any, Completion]]) -> list[Any]: ...

    def close(self) -> None: ...


class InlineJudge:
    """Judges in the calling thread (small runs, slow backends, and tests)."""

    def __init__(self, task: JudgingTask) -> None:
        self.task = task

    def judge_many(self, pairs: list[tuple[Any, Completion]]) -> list[Any]:
        return [self.task.judge(subject, completion) for subject, completion in pairs]

    def close(self) -> None:
        return None


class _WorkerTask:
    """The task of this worker process, installed once by the pool's initializer (one per process by design)."""

    task: JudgingTask | None = None


def _install(task: JudgingTask) -> None:
    _WorkerTask.task = task


def _judge_many(pairs: list[tuple[Any, Completion]]) -> list[Any]:
    task = _WorkerTask.task
    return [task.judge(subject, completion) for subject, completion in pairs]


def _ready() -> None:
    return None


class ProcessJudge:
    """Judges in one worker process; subjects go there without their chat messages (see Subject).

    The worker is forked (it starts at once, with the task's modules already imported) when it is
    made, which callers do before starting threads, sockets or SQLite connections of their own
    (see executors.local.run_local); it only ever runs `task.judge`.
    """

    def __init__(self, task: JudgingTask) -> None:
        context = multiprocessing.get_context("fork")
        self.pool = ProcessPoolExecutor(1, mp_context=context, initializer=_install, initargs=(task,))
        self.warm: Future = self.pool.submit(_ready)  # start the worker now, while the first requests are in flight

    def judge_many(self, pairs: list[tuple[Any, Completion]]) -> list[Any]:
        if not pairs:
            return []
        slim = [(getattr(subject, "subject", subject), completion) for subject, completion in pairs]
        return self.pool.submit(_judge_many, slim).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
