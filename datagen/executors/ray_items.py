"""What Ray workers hand back to the driver: judged results per chunk (shared by the openai/local and vLLM stages)."""
from __future__ import annotations

from dataclasses import dataclass

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
