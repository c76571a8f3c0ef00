"""What every executor shares: work items, their results, the run's counters, and request preparation.

Preparation ("skip done ids -> build the request -> cache key -> cache lookup") is written once, in
`RequestPlanner`, and used by the live engine, the dry run and `batch submit`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from datagen.backends.base import ChatRequest, Completion
from datagen.engine.cache import CacheKeys, ResponseCache


class Prepared(Protocol):
    """What a task's `prepare` returns: an item id (the unit of resume) and the chat request to make."""

    item_id: str
    request: ChatRequest


class Task(Protocol):
    """The part of a task the engine sees: a record's item id, and record -> prepared request."""

    def item_id(self, record: Any) -> str: ...

    def prepare(self, record: Any) -> Prepared: ...


@dataclass(frozen=True)
class Endpoint:
    """Which backend and model answer the requests: part of every cache key."""

    backend: str
    model: str
    _keys: CacheKeys | None = field(default=None, compare=False, repr=False)

    def cache_key(self, request: ChatRequest) -> str:
        keys = self._keys
        if keys is None:  # made on first use (a frozen dataclass: set around __setattr__)
            keys = CacheKeys(self.backend, self.model)
            object.__setattr__(self, "_keys", keys)
        return keys.key(request)

    def __reduce__(self):
        """Pickled as backend and model (Ray ships endpoints to workers): the key memo stays behind."""
        return (type(self), (self.backend, self.model))


@dataclass
class WorkItem:
    """One prepared request on its way through a run; `seq` is its place in the run's order (0, 1, ...)."""

    seq: int
    prepared: Any  # the task's Prepared object, handed back to the task with the completion
    key: str  # cache key
    cached: Completion | None = None
    prompt_tokens_est: int = 0

    @property
    def item_id(self) -> str:
        return self.prepared.item_id

    @property
    def request(self) -> ChatRequest:
        return self.prepared.request


@dataclass(frozen=True)
class Completed:
    """A completion for the item: from the backend in this run (`fresh`: cache it, bill it) or from the cache."""

    item: WorkItem
    completion: Completion
    fresh: bool
    attempts: int = 0


@dataclass(frozen=True)
class Failed:
    """The item exhausted its retries (or the backend raised); a rerun retries it."""

    item: WorkItem
    reason: str
    attempts: int


@dataclass(frozen=True)
class BudgetStopped:
    """The item was not started: its worst-case cost could have pushed the run past --budget."""

    item: WorkItem


@dataclass(frozen=True)
class AlreadyDone:
    """Records found finished by an earlier run (accepted or rejected), skipped without a request."""

    count: int


Result = Completed | Failed | BudgetStopped | AlreadyDone


@dataclass
class RunStats:
    """Counters a run reports at the end and records in its manifest."""

    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    requests: int = 0  # HTTP attempts made (retries included)
    retries: int = 0
    cache_hits: int = 0
    cost_usd: float | None = 0.0  # None when the model has no price
    budget_stopped: int = 0  # items not started because --budget would have been exceeded
    rate_limited_s: float = 0.0

    @property
    def processed(self) -> int:
        """Items finished in this run or found done: the progress bar's `done`."""
        return self.accepted + self.rejected + self.failed + self.skipped + self.budget_stopped


class RequestPlanner:
    """Records -> work items: skip done ids, build the request, key it, look it up in the cache.

    The one place this happens; the live engine, the dry run and `batch submit` all plan through it.
    `count_tokens` (for --tpm and --budget) is only called for requests that will be sent. `open` and
    `close` run in the thread that plans (SQLite connections belong to the thread that made them).
    """

    def __init__(self, task: Task, endpoint: Endpoint, done: set[str] | frozenset[str], cache_path: Path | None,
                 count_tokens: Callable[[list[dict[str, str]]], int] | None = None) -> None:
        self.task = task
        self.endpoint = endpoint
        self.done = done
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: ResponseCache | None = None
        self.count_tokens = count_tokens
        self.next_seq = 0

    def open(self) -> None:
        """Open the response cache for lookups, if there is one (a missing file is an empty cache)."""
        if self.cache_path is not None and self.cache_path.exists():
            self.cache = ResponseCache(self.cache_path)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def plan(self, records: Iterable[Any]) -> Iterator[WorkItem | AlreadyDone]:
        """A work item per pending record (in record order), and AlreadyDone(1) per finished one."""
        for record in records:
            if self.task.item_id(record) in self.done:
                yield AlreadyDone(1)
                continue
            yield self.item(self.task.prepare(record))

    def item(self, prepared: Prepared) -> WorkItem:
        """The work item of one prepared request: keyed, looked up, its prompt counted if it will be sent."""
        key = self.endpoint.cache_key(prepared.request)
        cached = self.cache.get(key) if self.cache is not None else None
        est = self.count_tokens(prepared.request.messages) if (self.count_tokens and cached is None) else 0
        item = WorkItem(self.next_seq, prepared, key, cached, est)
        self.next_seq += 1
        return item

    @staticmethod
    def next_chunk(planned: Iterator[WorkItem | AlreadyDone], size: int) -> tuple[list[WorkItem], int, bool]:
        """From `plan(...)`: up to `size` items, how many records were already done, and whether they ran out."""
        items: list[WorkItem] = []
        skipped = 0
        for entry in planned:
            if isinstance(entry, AlreadyDone):
                skipped += entry.count
                continue
            items.append(entry)
            if len(items) >= size:
                return items, skipped, False
        return items, skipped, True
