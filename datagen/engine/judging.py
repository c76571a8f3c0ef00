"""Where a task judges its completions: in the recording thread, or in a worker process.

Parsing and the quality checks cost more CPU per sample than the HTTP request itself; in a thread
they hold the GIL against the event loop. `ProcessJudge` runs them in a separate process, so at high
concurrency the event loop keeps the requests flowing while another core checks.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

from datagen.backends.base import Completion
from datagen.engine.heap import settle_worker
from datagen.errors import VisinstructError


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


_STOP = b""  # the parent's last message to a worker (a pickled batch is never empty)
# The parent's ends of every judge worker's pipe still open in this process (all pools). A worker closes the
# copies it inherits: held there, they would hide the parent's death from the workers at their other ends
# (no end-of-file), and an orphaned worker would wait for batches forever.
_PARENT_ENDS: set[Connection] = set()


def _serve(task: JudgingTask, conn: Connection) -> None:
    """A judge worker's life: batches in, verdicts out, in the order they came, until the parent says stop or
    goes away."""
    for inherited in list(_PARENT_ENDS):
        inherited.close()
    _PARENT_ENDS.clear()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops us
    settle_worker()  # the inherited heap frozen, the collector run less often (datagen.engine.heap)
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def take() -> None:
        # Batches are read as they come, so the parent never blocks sending while this process has verdicts
        # it has not read yet (each side would wait on the other).
        try:
            while True:
                inbox.put(conn.recv_bytes())
        except (EOFError, OSError):
            inbox.put(None)

    def give() -> None:
        # Verdicts wait here, not in this process's judging, until the parent reads them (it reads when it
        # collects a batch, and a pipe holds about one part's verdicts).
        while (reply := outbox.get()) is not None:
            try:
                conn.send_bytes(reply)
            except OSError:  # the parent is gone
                return

    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    threading.Thread(target=take, name="datagen-judge-inbox", daemon=True).start()
    sender = threading.Thread(target=give, name="datagen-judge-outbox")
    sender.start()
    while batch := inbox.get():  # b"": stop; None: the parent is gone
        try:
            reply = pickle.dumps((True, [task.judge(subject, completion) for subject, completion in pickle.loads(batch)]),
                                 pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - a bug in the task: raised in the parent, with where it happened
            reply = pickle.dumps((False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"), pickle.HIGHEST_PROTOCOL)
        outbox.put(reply)
    if batch is None:
        os._exit(0)  # the parent is gone: nobody reads what is still waiting to be sent
    outbox.put(None)
    sender.join()


class JudgeWorkerError(VisinstructError):
    """A judge worker process ended, or failed, while batches were out with it."""


class _Worker:
    """One forked judge process and the pipe to it. Each batch part sent gets one reply, in the order sent."""

    def __init__(self, context: Any, task: JudgingTask) -> None:
        self.conn, child = context.Pipe()
        _PARENT_ENDS.add(self.conn)
        self.process = context.Process(target=_serve, name="datagen-judge", daemon=True, args=(task, child))
        self.process.start()
        child.close()
        self.waiting: deque[_Part] = deque()

    def send(self, pairs: list[tuple[Any, Completion]]) -> "_Part":
        blob = pickle.dumps(pairs, pickle.HIGHEST_PROTOCOL)
        try:
            self.conn.send_bytes(blob)
        except OSError:  # its end is closed: it died (an OSError here is not the run's disk failing)
            raise self._ended() from None
        part = _Part(self)
        self.waiting.append(part)
        return part

    def receive(self) -> None:
        """Wait for the next reply; it belongs to the oldest part still waiting."""
        try:
            reply = self.conn.recv_bytes()
        except (EOFError, OSError):
            raise self._ended() from None
        ok, payload = pickle.loads(reply)
        self.waiting.popleft().settle(ok, payload)

    def _ended(self) -> JudgeWorkerError:
        self.process.join(1)
        return JudgeWorkerError(
            f"a judge worker process (pid {self.process.pid}) ended with exit code {self.process.exitcode} "
            "while checking samples",
            "rerun the same command to resume (finished samples are kept); if it was killed for memory, "
            "set DATAGEN_JUDGE_WORKERS=1",
        )

    def stop(self) -> None:
        """Tell the worker to finish (it exits once it has sent what it was judging)."""
        try:
            self.conn.send_bytes(_STOP)
        except OSError:  # it is gone already
            pass
        _PARENT_ENDS.discard(self.conn)
        self.conn.close()

    def join(self) -> None:
        self.process.join(5)
        if self.process.is_alive():  # still judging what it was sent: not needed any more
            self.process.kill()
            self.process.join()


class _Part:
    """The verdicts of one worker's share of a batch, once its reply has been read."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.ok: bool | None = None
        self.payload: Any = None

    def settle(self, ok: bool, payload: Any) -> None:
        self.ok, self.payload = ok, payload

    def done(self) -> bool:
        worker = self.worker
        while self.ok is None and worker.conn.poll():
            worker.receive()
        return self.ok is not None

    def result(self) -> list[Any]:
        while self.ok is None:
            self.worker.receive()
        if not self.ok:
            raise RuntimeError(f"checking a batch failed in a judge worker process: {self.payload}")
        return self.payload


@dataclass(frozen=True)
class _Parts:
    """Verdicts being reached by worker processes, one contiguous part of the batch each."""

    parts: list[_Part]

    def done(self) -> bool:
        return all(part.done() for part in self.parts)

    def result(self) -> list[Any]:
        return [verdict for part in self.parts for verdict in part.result()]


class ProcessJudge:
    """Judges in worker processes; subjects go there without their chat messages (see Subject).

    The workers are forked (they start at once, with the task's modules already imported) when it is
    made, which callers do before starting threads, sockets or SQLite connections of their own
    (see executors.local.run_local); they only ever run `task.judge`. A batch is cut into one contiguous
    part per worker and the verdicts come back in the batch's order.

    Each worker has one pipe: the calling thread pickles and sends a part, and reads the reply when it
    collects the verdicts, so no thread of the parent's runs for the workers (a process pool's two
    hand-off threads contend for the GIL with the event loop: bench/RESULTS.md, issue 8, third session).
    A worker reads batches as they come (a thread of its own), so sending never waits on unread verdicts,
    and it exits when the parent says stop or dies.
    """

    def __init__(self, task: JudgingTask, workers: int = 1) -> None:
        context = multiprocessing.get_context("fork")
        self.workers = max(1, workers)
        self._pool = [_Worker(context, task) for _ in range(self.workers)]

    def judge_many(self, pairs: list[tuple[Any, Completion]]) -> list[Any]:
        return self.submit(pairs).result()

    def submit(self, pairs: list[tuple[Any, Completion]]) -> PendingVerdicts:
        """Send the batch to the workers and return at once; the caller collects the verdicts when they are done."""
        if not pairs:
            return Ready([])
        slim = [(getattr(subject, "subject", subject), completion) for subject, completion in pairs]
        size = -(-len(slim) // self.workers)
        return _Parts([worker.send(slim[start:start + size])
                       for worker, start in zip(self._pool, range(0, len(slim), size))])

    def close(self) -> None:
        """Stop the workers. They exit on their own (tearing down a process's memory takes a few ms); a thread
        reaps them, so a run's end does not wait for that."""
        for worker in self._pool:
            worker.stop()
        threading.Thread(target=self._reap, name="datagen-judge-reaper", daemon=True).start()

    def _reap(self) -> None:
        for worker in self._pool:
            worker.join()
