"""The live engine: work items -> completions | failures, with the limiter, retries, cache and budget.

It knows nothing of LLaVA. The event loop plans requests a chunk at a time (the task's preparation,
cache keys, cache lookups) and runs them (rate limiter, retries, budget); a store thread hands finished
results to a `ResultRecorder` (cache write, then the task's judgement and the sink), because that
thread waits: on the judge processes' verdicts and on the disk. Planning has no such wait, and a thread
of its own would not take its CPU off the loop (the GIL): it would only add GIL hand-offs, each a
futex call and a context switch (bench/RESULTS.md, issue 8, third session). Bounded queues keep
memory flat however many records a run has.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from tenacity import RetryCallState, wait_random_exponential

from datagen.backends.base import Backend, Completion
from datagen.engine.cache import ResponseCache
from datagen.engine.config import EngineConfig
from datagen.engine.cost import BudgetGuard, Price
from datagen.engine.judging import Judge, PendingVerdicts
from datagen.engine.errors import EndpointUnreachableError, RateLimitedError, TransientError
from datagen.engine.ratelimit import RateLimiter
from datagen.engine.work import (AlreadyDone, BudgetStopped, Completed, Endpoint, Failed, RequestPlanner, Result,
                                 RunStats, WorkItem)
from datagen.errors import VisinstructError
from datagen.outputs import write_error

FEED_CHUNK = 64  # records planned before the loop turns to its other tasks (cache lookups block it briefly)
# Batches whose judgement may still be running while the recorder takes the next ones: keeps the judge workers
# busy while the recording thread writes, and bounds what is held in memory.
JUDGE_BATCHES_AHEAD = 4
# Without a single success, this many failed connection attempts mean a dead endpoint, not a blip.
UNREACHABLE_ATTEMPTS = 3

ProgressFn = Callable[[RunStats], None]
log = logging.getLogger(__name__)


class VerdictSink(Protocol):
    """Where judged results go (datagen.sink.OutputSink)."""

    def open(self) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def skipped(self, count: int) -> None: ...
    def verdict(self, seq: int, verdict: Any) -> None: ...
    def failure(self, seq: int, item_id: str, reason: str, attempts: int) -> None: ...
    def not_started(self, seq: int) -> None: ...


class ResultRecorder:
    """Stores results: fresh completions into the cache first (a crash never pays twice), then counts,
    the task's judgement, and the sink. Used by the live engine and by Batch API collection alike.

    A batch's judgement runs while the next batches come in (up to JUDGE_BATCHES_AHEAD of them): worker
    processes judge one batch while this thread records the previous one. Batches reach the sink in the
    order they were recorded; `close` waits for those still being judged.
    """

    def __init__(self, judge: Judge, sink: VerdictSink, stats: RunStats,
                 endpoint: Endpoint, price: Price | None, cache_path: Path | None = None,
                 on_progress: ProgressFn | None = None) -> None:
        self.judge = judge
        self.sink = sink
        self.stats = stats
        self.endpoint = endpoint
        self.price = price
        self.cache_path = cache_path
        self.cache: ResponseCache | None = None
        self.on_progress = on_progress
        self._judging: deque[tuple[list[Result], PendingVerdicts]] = deque()

    def open(self) -> None:
        """Open the cache and the sink, in the thread that records (SQLite connections stay in their thread)."""
        self.cache = ResponseCache(self.cache_path) if self.cache_path else None
        self.sink.open()

    def close(self) -> None:
        """Close the cache (nothing more is recorded), wait for the batches still being judged, then close the
        sink (it writes what it still holds) and the judge.

        The cache goes first: closing its last connection copies the write-ahead log into the database file
        (~10 ms for a few thousand rows), which then overlaps the judges' last batches instead of adding to the
        run's end. Its rows are committed already, before any line that needs them.
        """
        try:
            if self.cache is not None:
                cache, self.cache = self.cache, None
                cache.close()
            self._settle(wait=True)
        finally:
            try:
                self.sink.close()
            finally:
                self.judge.close()

    def record(self, results: list[Result]) -> None:
        """Store a batch of results; their cache rows go in one transaction before any output line."""
        if self.cache is not None:
            rows = [(r.item.key, self.endpoint.backend, self.endpoint.model, r.item.request.key, r.completion)
                    for r in results if isinstance(r, Completed) and r.fresh]
            if rows:
                self.cache.put_many(rows)
        completed = [r for r in results if isinstance(r, Completed)]
        self._judging.append((results, self.judge.submit([(r.item.prepared, r.completion) for r in completed])))
        self._settle(wait=False)

    def _settle(self, wait: bool) -> None:
        """Hand the judged batches to the sink, oldest first: those done (all, if `wait`; the oldest, if too many
        are waiting)."""
        judging = self._judging
        settled = False
        while judging and (wait or judging[0][1].done() or len(judging) > JUDGE_BATCHES_AHEAD):
            results, pending = judging[0]
            verdicts = pending.result()
            judging.popleft()
            self._apply(results, verdicts)
            settled = True
        if settled:
            self.sink.flush()
            if self.on_progress:
                self.on_progress(self.stats)

    def _apply(self, results: list[Result], judged: list[Any]) -> None:
        stats, sink = self.stats, self.sink
        verdicts = iter(judged)
        for result in results:
            if isinstance(result, Completed):
                completion = result.completion
                if result.fresh:
                    completion_tokens = completion.total_completion_tokens
                    stats.prompt_tokens += completion.prompt_tokens
                    stats.completion_tokens += completion_tokens
                    if stats.cost_usd is not None:
                        stats.cost_usd = None if self.price is None else stats.cost_usd + self.price.cost(
                            completion.prompt_tokens, completion_tokens)
                else:
                    stats.cache_hits += 1
                sink.verdict(result.item.seq, next(verdicts))
            elif isinstance(result, Failed):
                sink.failure(result.item.seq, result.item.item_id, result.reason, result.attempts)
            elif isinstance(result, BudgetStopped):
                sink.not_started(result.item.seq)
            else:
                sink.skipped(result.count)


def backoff_s(config: EngineConfig, error: TransientError, attempt_no: int) -> float:
    """The server's Retry-After when it gave one, else tenacity's exponential backoff with full jitter.

    Only the wait policy comes from tenacity: it is consulted once per retry (rare), while the retry
    loop itself stays plain because it runs once per request on the event loop.
    """
    if error.retry_after is not None:
        return float(error.retry_after)
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt_no
    return float(wait_random_exponential(multiplier=config.backoff_base_s, max=config.backoff_max_s)(state))


class LiveEngine:
    """Runs planned requests against one backend; `await run(...)` returns the stats.

    `price` is the model's price (None: unknown, so no cost and no --budget); the planner and the
    recorder are built by the executor, which owns the cache connections' threads (see `run`).
    """

    def __init__(self, backend: Backend, config: EngineConfig, concurrency: int, price: Price | None,
                 stats: RunStats | None = None) -> None:
        self.backend = backend
        self.config = config
        self.concurrency = max(1, concurrency)
        self.stats = stats or RunStats()
        self.limiter = RateLimiter(config.rpm, config.tpm)
        self.price = price
        if price is None:
            self.stats.cost_usd = None
        self.budget: BudgetGuard | None = None
        if config.budget_usd is not None:
            if price is None:
                raise VisinstructError(f"no price known for model {backend.model!r}, so --budget cannot be enforced",
                                       "add the model to a price file and pass --prices FILE")
            self.budget = BudgetGuard(config.budget_usd, price)
        self.backend.observe_headers = self.limiter.observe
        self.fatal: list[BaseException] = []
        self.successes = 0
        self._pending: list[Result] = []
        self._closing = False

    @property
    def needs_token_counts(self) -> bool:
        """Whether planning must count prompt tokens (for --tpm or --budget)."""
        return bool(self.config.tpm) or self.budget is not None

    async def run(self, planner: RequestPlanner, records: Iterable[Any], recorder: ResultRecorder) -> RunStats:
        """Plan `records` and request them here, record results in a store thread.

        The recorder is opened and closed in the store thread, the planner here (SQLite connections belong to
        the thread that made them); the recorder first, so the cache file exists when the planner looks.
        """
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        store_thread = ThreadPoolExecutor(1, thread_name_prefix="datagen-store")
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=2 * self.concurrency)
        self._wakeup = asyncio.Event()
        self._room = asyncio.Semaphore(4 * self.concurrency)  # bounds results waiting for the store
        self._store_failed = False
        opened = False
        try:
            await loop.run_in_executor(store_thread, recorder.open)
            opened = True
            planner.open()
            workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.concurrency)]
            # Feeding and requesting run as one task, which a failed store (a full disk) cancels: nothing may
            # wait on a store that will not drain again.
            self._work = asyncio.create_task(self._produce(planner, records, queue, workers))
            store_task = asyncio.create_task(self._drain(loop, store_thread, recorder))
            try:
                await self._work
            except asyncio.CancelledError:
                if not self._store_failed:
                    raise  # cancelled from outside (Ctrl-C)
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                self._closing = True
                self._wakeup.set()
                await store_task
        finally:
            # Whatever was received but not yet stored is stored now, even on Ctrl-C or an error; after a failed
            # store only the files are closed (the first error is the one reported).
            if opened:
                await loop.run_in_executor(store_thread, self._finish, recorder)
            planner.close()
            store_thread.shutdown(wait=False)
            self.stats.elapsed_s = time.perf_counter() - started
            self.stats.rate_limited_s = self.limiter.waited_s
        if self.fatal:
            raise self.fatal[0]
        return self.stats

    def _finish(self, recorder: ResultRecorder) -> None:
        """In the store thread: store what is pending, then close the recorder (the sink, the cache)."""
        batch, self._pending = self._pending, []
        if self._store_failed:
            try:
                recorder.close()
            except Exception:  # noqa: BLE001 - the store already failed; that error is the one the run reports
                log.debug("closing after a failed store also failed", exc_info=True)
            return
        try:
            if batch:
                recorder.record(batch)
        finally:
            recorder.close()

    async def _produce(self, planner: RequestPlanner, records: Iterable[Any], queue: asyncio.Queue,
                       workers: list[asyncio.Task]) -> None:
        await self._feed(planner.plan(records), queue)
        # Planned: its cache connection is closed now, while requests run, not in the run's serial end.
        planner.close()
        await asyncio.gather(*workers)

    async def _feed(self, planned: Iterator[WorkItem | AlreadyDone], queue: asyncio.Queue) -> None:
        exhausted = False
        while not exhausted and not self.fatal:
            items, skipped, exhausted = RequestPlanner.next_chunk(planned, FEED_CHUNK)
            await asyncio.sleep(0)  # a chunk of done ids puts nothing on the queue: let the requests run anyway
            if skipped:
                self._emit(AlreadyDone(skipped))
            for item in items:
                if self.fatal:
                    break
                await queue.put(item)
        for _ in range(self.concurrency):
            await queue.put(None)

    def _emit(self, result: Result) -> None:
        self._pending.append(result)
        self._wakeup.set()

    async def _drain(self, loop, store_thread, recorder: ResultRecorder) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._pending:
                batch, self._pending = self._pending, []
                try:
                    await loop.run_in_executor(store_thread, recorder.record, batch)
                except Exception as exc:  # a write error (full disk), or any other failure to store
                    # The run stops: requests in flight are abandoned (their completions could not be
                    # stored anyway) and the error is raised by `run`.
                    if isinstance(exc, OSError):
                        exc = write_error(exc.filename or "the run's output", exc, resume=True)
                    self.fatal.insert(0, exc)
                    self._store_failed = True
                    self._work.cancel()
                    return
                for result in batch:
                    if not isinstance(result, AlreadyDone):  # skip counts never took a slot
                        self._room.release()
            if self._closing and not self._pending:
                return

    async def _worker(self, queue: asyncio.Queue) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            if self.fatal:
                continue
            await self._room.acquire()
            if item.cached is not None:
                self._emit(Completed(item, item.cached, fresh=False))
                continue
            reserved = 0.0
            if self.budget is not None:
                got = self.budget.reserve(item.prompt_tokens_est, item.request.params.max_tokens)
                if got is None:
                    self._emit(BudgetStopped(item))
                    continue
                reserved = got
            try:
                completion, attempts = await self._request(item)
            except VisinstructError as exc:
                self.fatal.append(exc)
                self._room.release()
                continue
            except Exception as exc:  # retries exhausted, or a backend bug: this item fails, the run goes on
                if self.budget is not None:
                    self.budget.settle(reserved, 0.0)
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                self._emit(Failed(item, reason, getattr(exc, "attempts", 1)))
                continue
            if self.budget is not None:
                self.budget.settle(reserved, self.price.cost(completion.prompt_tokens, completion.total_completion_tokens))
            self._emit(Completed(item, completion, fresh=True, attempts=attempts))

    async def _request(self, item: WorkItem) -> tuple[Completion, int]:
        """One completion with the limiter and retries; raises the last error when retries run out.

        A plain loop rather than a retry library: this runs once per request on the event loop, so its
        cost is paid thousands of times a second at high concurrency.
        """
        config, stats = self.config, self.stats
        reserve_tokens = item.prompt_tokens_est + item.request.params.max_tokens
        attempt_no = 0
        while True:
            attempt_no += 1
            if attempt_no > 1:
                stats.retries += 1
            await self.limiter.acquire(reserve_tokens)
            stats.requests += 1
            try:
                completion = await self.backend.complete(item.request)
            except RateLimitedError as exc:
                self.limiter.pause(exc.retry_after if exc.retry_after is not None else 1.0)
                error: TransientError = exc
            except EndpointUnreachableError as exc:
                if self.successes == 0 and attempt_no >= UNREACHABLE_ATTEMPTS:
                    raise VisinstructError(
                        f"cannot reach the endpoint ({exc.reason})", "start the server or fix --base-url"
                    ) from None
                error = exc
            except TransientError as exc:
                error = exc
            else:
                self.successes += 1
                self.limiter.settle_tokens(reserve_tokens, completion.prompt_tokens + completion.total_completion_tokens)
                return completion, attempt_no
            if attempt_no > config.max_retries:
                error.reason = f"{error.reason} (gave up after {attempt_no} attempts)"
                error.attempts = attempt_no
                raise error
            await asyncio.sleep(backoff_s(config, error, attempt_no))
