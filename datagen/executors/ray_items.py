"""What Ray workers hand back to the driver: judged results per chunk (shared by the openai/local and vLLM stages)."""
from __future__ import annotations

import os
import select
from dataclasses import dataclass
from pathlib import Path

from datagen.backends.base import ChatRequest, Completion
from datagen.engine.judging import Ready
from datagen.engine.work import Result
from datagen.errors import VisinstructError
from datagen.task import Verdict


@dataclass(frozen=True)
class Judged:
    """A work item's stand-in on its way back to the driver: the id and the verdict a worker reached (and the
    request, when the driver stores the completion in the cache itself)."""

    item_id: str
    verdict: Verdict | None = None
    request: ChatRequest | None = None


class WorkerVerdicts:
    """The recorder's judge on the driver: the verdicts were reached on the workers; it hands them on."""

    def judge_many(self, pairs: list[tuple[Judged, Completion]]) -> list[Verdict | None]:
        return [judged.verdict for judged, _ in pairs]

    def submit(self, pairs: list[tuple[Judged, Completion]]) -> Ready:
        return Ready(self.judge_many(pairs))

    def close(self) -> None:
        return None


@dataclass
class ChunkResult:
    """One actor call's output: a result per item, the request counters, and a fatal error if one stopped it."""

    results: list[Result]
    requests: int = 0
    retries: int = 0
    started_at: float = 0.0  # wall clock of the call's start (the bench's "first request")
    fatal: VisinstructError | None = None
    worker_pid: int = 0  # the worker process that ran the call, and its peak RSS so far (MB)
    worker_peak_rss_mb: float = 0.0


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if it is gone
    or a zombie (killed, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass(frozen=True)
class DriverProcess:
    """The run's driver as its workers see it: a worker on the driver's node checks before each request that
    the driver still runs, so a killed driver's workers send nothing more than what was already on its way
    (Ray stops the job's actors too, but only once it has noticed; on other nodes that is the only stop).
    The start time tells the driver from a later process that got its pid."""

    node_id: str
    pid: int
    started: str | None

    @classmethod
    def this_process(cls, node_id: str) -> "DriverProcess":
        return cls(node_id, os.getpid(), _process_start(os.getpid()))

    def watch_from(self, node_id: str) -> bool:
        """Whether a worker on `node_id` can see the driver's process (same node, and /proc to read)."""
        return node_id == self.node_id and self.started is not None

    def alive(self) -> bool:
        return _process_start(self.pid) == self.started

    def watch(self) -> "DriverWatch":
        """What a worker on the driver's node asks before each request (opened in the worker's process)."""
        return DriverWatch(self)


class DriverWatch:
    """`DriverProcess.alive` for a worker's every request, without reading /proc each time (~26 µs a read).

    A pidfd (Linux >= 5.3) names one process, never a later one given its pid, and polls readable once that
    process has ended (a zombie included). It is opened, then the driver's start time checked: if it matches,
    the pidfd is the driver's. Where pidfds are not available the check reads /proc as `DriverProcess.alive`.
    """

    def __init__(self, driver: DriverProcess) -> None:
        self.driver = driver
        self.gone = False
        self._poll: select.poll | None = None
        try:
            fd = os.pidfd_open(driver.pid)
        except (AttributeError, OSError):  # no pidfds here, or no such process (then /proc says gone too)
            return
        if not driver.alive():  # the pid is another process's now, or the driver has ended already
            os.close(fd)
            self.gone = True
            return
        self._fd = fd  # kept open for the worker's lifetime: one descriptor per worker
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def alive(self) -> bool:
        if self.gone:
            return False
        if self._poll is None:
            return self.driver.alive()
        self.gone = bool(self._poll.poll(0))  # readable: the driver has ended
        return not self.gone
