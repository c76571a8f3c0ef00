"""The generation run: records -> prompts -> completions -> samples -> JSONL.

Three stages keep the event loop free for network I/O: a feeder thread turns records into requests
(context rendering, cache keys, cache lookups), the event loop runs the requests (rate limiter,
retries, budget), and a sink thread stores each completion (cache write, parsing, quality checks,
JSONL). Bounded queues between them keep memory flat however many images a split has.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from datagen.backends.base import Backend, ChatRequest, Completion, SamplingParams
from datagen.coco import ImageRecord
from datagen.context import ContextBuilder, context_meta
from datagen.engine.cache import ResponseCache, cache_key
from datagen.engine.config import EngineConfig
from datagen.engine.cost import BudgetGuard, Price, load_prices
from datagen.engine.errors import EndpointUnreachableError, RateLimitedError, TransientError
from datagen.engine.ratelimit import RateLimiter
from datagen.errors import VisinstructError
from datagen.jsonl import JsonlWriter, iter_jsonl, repair_tail
from datagen.parse import ParseError, build_sample
from datagen.prompts import PromptSet, pick_instruction
from datagen.schema import Sample

log = logging.getLogger(__name__)

FEED_CHUNK = 64  # records prepared per hop to the feeder thread: amortises the thread switch
# Without a single success, this many failed connection attempts mean a dead endpoint, not a blip.
UNREACHABLE_ATTEMPTS = 3


def sample_id(image_id: int) -> str:
    """LLaVA's id convention: the zero-padded COCO image id."""
    return f"{image_id:012d}"


def rejects_path(out: Path) -> Path:
    """Where unparseable outputs of `out` go: data/detail.jsonl -> data/detail.rejects.jsonl."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejects.jsonl")


def runs_path(out: Path) -> Path:
    """The run manifest log beside `out`: one JSON line per run."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".runs.jsonl")


def failures_path(out: Path) -> Path:
    """Items of the latest run that exhausted their retries: data/detail.jsonl -> data/detail.failures.jsonl."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".failures.jsonl")


def done_ids(*paths: Path) -> set[str]:
    """Ids already written (accepted or rejected) by earlier runs into these files."""
    seen: set[str] = set()
    for path in paths:
        if path.exists():
            repair_tail(path)
            seen.update(str(r.get("id")) for r in iter_jsonl(path))
    return seen


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


@dataclass(frozen=True)
class Job:
    """One generation run's fixed settings."""

    split: str
    prompts: PromptSet
    params: SamplingParams
    out: Path
    concurrency: int
    checker: Checker | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    # The split's context (negatives need co-occurrence counts); None: the plain one of the split.
    context: ContextBuilder | None = None


ProgressFn = Callable[[RunStats], None]
# A quality gate: given the parsed sample, its image record and the raw completion, the reject
# reason codes (empty list = accept). Stateful checkers (near-duplicates) keep state across calls.
Checker = Callable[[Sample, ImageRecord, Completion], list[str]]


def build_request(job: Job, record: ImageRecord) -> tuple[ChatRequest, str]:
    """The chat request for one image, and the context text the writer sees."""
    context, _ = (job.context or ContextBuilder(job.split)).render(record)
    request = ChatRequest(key=f"{record.id}:{job.split}", messages=job.prompts.messages(context), params=job.params)
    return request, context


@dataclass
class WorkItem:
    """One image on its way through the run."""

    record: ImageRecord
    request: ChatRequest
    context: str
    key: str
    cached: Completion | None = None
    prompt_tokens_est: int = 0


@dataclass
class Outcome:
    """What the event loop hands the sink: a completion to store, or a failure to record."""

    item: WorkItem | None
    completion: Completion | None = None
    fresh: bool = False  # came from the backend in this run (so it goes into the cache and the bill)
    failure: str = ""
    attempts: int = 0
    skipped: int = 0


class ResultSink:
    """Stores outcomes: cache first (so a crash never pays twice), then parse, check and append to JSONL."""

    def __init__(self, job: Job, backend: Backend, stats: RunStats, price: Price | None,
                 on_progress: ProgressFn | None) -> None:
        self.job = job
        self.stats = stats
        self.price = price
        self.on_progress = on_progress
        self.backend_name, self.model = backend.name, backend.model
        self.meta_base = {"backend": backend.name, "prompt_hash": job.prompts.hash, "seed": job.params.seed}
        self.cache: ResponseCache | None = None
        self.accepted: JsonlWriter | None = None
        self.rejected: JsonlWriter | None = None
        self.failed_fh = None

    def open(self) -> None:
        """Open files in the sink thread (SQLite connections belong to the thread that made them)."""
        cfg = self.job.engine
        self.cache = ResponseCache(cfg.cache_path) if cfg.cache_path else None
        self.accepted = JsonlWriter(self.job.out)
        self.rejected = JsonlWriter(rejects_path(self.job.out))
        # The failures file lists the latest run's failures only; it is created at the first one.
        self.failed_file = Path(cfg.failures_path or failures_path(self.job.out))
        self.failed_file.unlink(missing_ok=True)

    def close(self) -> None:
        for closable in (self.cache, self.accepted, self.rejected, self.failed_fh):
            if closable is not None:
                closable.close()

    def handle_batch(self, outcomes: list[Outcome]) -> None:
        """Store a batch of outcomes; the cache rows go in one transaction before any JSONL line."""
        if self.cache is not None:
            self.cache.put_many([
                (o.item.key, self.backend_name, self.model, o.item.request.key, o.completion)
                for o in outcomes if o.fresh and o.completion is not None
            ])
        for outcome in outcomes:
            self.handle(outcome)
        if self.on_progress:
            self.on_progress(self.stats)

    def handle(self, outcome: Outcome) -> None:
        stats = self.stats
        if outcome.skipped:
            stats.skipped += outcome.skipped
            return
        item = outcome.item
        if outcome.failure:
            if outcome.failure == "budget":
                stats.budget_stopped += 1
                return
            stats.failed += 1
            stats.failures.append(f"{item.record.id}: {outcome.failure}")
            if self.failed_fh is None:
                self.failed_fh = open(self.failed_file, "a", encoding="utf-8")
            self.failed_fh.write(json.dumps({"id": sample_id(item.record.id), "split": self.job.split,
                                             "reason": outcome.failure, "attempts": outcome.attempts}) + "\n")
            self.failed_fh.flush()
            return
        self.write_completion(item, outcome.completion, outcome.fresh)

    def write_completion(self, item: WorkItem, completion: Completion, fresh: bool) -> None:
        """Parse, check and append one completion (live, cached, or from a Batch API result file)."""
        stats, job, record = self.stats, self.job, item.record
        if fresh:
            stats.prompt_tokens += completion.prompt_tokens
            stats.completion_tokens += completion.completion_tokens
            if stats.cost_usd is not None:
                stats.cost_usd = None if self.price is None else stats.cost_usd + self.price.cost(
                    completion.prompt_tokens, completion.completion_tokens)
        else:
            stats.cache_hits += 1
        meta = {
            **self.meta_base,
            "model": completion.model,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
            "finish_reason": completion.finish_reason,
            **context_meta(job.split, item.context),
        }
        instruction = pick_instruction(job.prompts.instructions, record.id, job.params.seed) if job.split == "detail" else None
        try:
            sample = build_sample(
                split=job.split,
                text=completion.text,
                sample_id=sample_id(record.id),
                image=record.file_name,
                instruction=instruction,
                meta=meta,
                truncated=completion.truncated,
            )
            reasons = job.checker(sample, record, completion) if job.checker else []
            # A quality checker's reasons carry what failed (`details`: code -> text), e.g. the objects judged hallucinated.
            detail = "; ".join(f"{code}: {text}" for code, text in getattr(reasons, "details", {}).items())
        except ParseError as exc:
            sample, reasons, detail = None, [exc.code], exc.detail
        if reasons:
            stats.rejected += 1
            for code in reasons:
                stats.reject_reasons[code] = stats.reject_reasons.get(code, 0) + 1
            entry = sample.to_record() if sample else {"id": sample_id(record.id), "image": record.file_name, "split": job.split}
            self.rejected.write({**entry, "reject_reasons": reasons, "detail": detail, "context": item.context,
                                 "raw": completion.text, "meta": meta})
        else:
            stats.accepted += 1
            self.accepted.write(sample.to_record())


class RequestFeeder:
    """Turns records into work items off the event loop: context, messages, cache key, cache lookup."""

    def __init__(self, job: Job, backend: Backend, records: Iterable[ImageRecord], skip: set[str],
                 count_tokens: Callable[[list[dict[str, str]]], int] | None) -> None:
        self.job = job
        self.backend_name, self.model = backend.name, backend.model
        self.records: Iterator[ImageRecord] = iter(records)
        self.skip = skip
        self.count_tokens = count_tokens
        self.cache: ResponseCache | None = None

    def next_chunk(self, size: int) -> tuple[list[WorkItem], int, bool]:
        """Up to `size` items to request, how many records were already done, and whether records ran out."""
        if self.cache is None and self.job.engine.cache_path:
            self.cache = ResponseCache(self.job.engine.cache_path)
        items: list[WorkItem] = []
        skipped = 0
        for record in self.records:
            if sample_id(record.id) in self.skip:
                skipped += 1
                continue
            request, context = build_request(self.job, record)
            key = cache_key(self.backend_name, self.model, request)
            cached = self.cache.get(key) if self.cache is not None else None
            est = self.count_tokens(request.messages) if (self.count_tokens and cached is None) else 0
            items.append(WorkItem(record, request, context, key, cached, est))
            if len(items) >= size:
                return items, skipped, False
        return items, skipped, True

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _wait_for(config: EngineConfig):
    """Server's Retry-After when it gave one, else exponential backoff with full jitter."""
    backoff = wait_random_exponential(multiplier=config.backoff_base_s, max=config.backoff_max_s)

    def wait(state) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = getattr(exc, "retry_after", None)
        return float(hinted) if hinted is not None else backoff(state)

    return wait


class GenerationRun:
    """One run of the engine over a stream of records; `await run()` returns the stats."""

    def __init__(self, job: Job, backend: Backend, records: Iterable[ImageRecord],
                 on_progress: ProgressFn | None = None, done: set[str] | None = None) -> None:
        self.job = job
        self.backend = backend
        self.config = job.engine
        self.stats = RunStats()
        self.limiter = RateLimiter(self.config.rpm, self.config.tpm)
        prices = load_prices(self.config.prices_path)
        self.price = prices.lookup(backend.model) if backend.name != "local" else Price(0.0, 0.0)
        if self.price is None:
            self.stats.cost_usd = None
        self.budget: BudgetGuard | None = None
        if self.config.budget_usd is not None:
            if self.price is None:
                raise VisinstructError(f"no price known for model {backend.model!r}, so --budget cannot be enforced",
                                       "add the model to a price file and pass --prices FILE")
            self.budget = BudgetGuard(self.config.budget_usd, self.price)
        count_tokens = None
        if self.config.tpm or self.budget is not None:
            from datagen.engine.tokens import PromptTokenCounter

            count_tokens = PromptTokenCounter().count
        skip = done if done is not None else done_ids(job.out, rejects_path(job.out))
        self.feeder = RequestFeeder(job, backend, records, skip, count_tokens)
        self.sink = ResultSink(job, backend, self.stats, self.price, on_progress)
        self.fatal: list[BaseException] = []
        self.successes = 0
        self._pending: list[Outcome] = []
        self._closing = False

    async def run(self) -> RunStats:
        started = time.perf_counter()
        concurrency = max(1, self.job.concurrency)
        loop = asyncio.get_running_loop()
        feed_thread = ThreadPoolExecutor(1, thread_name_prefix="datagen-feed")
        sink_thread = ThreadPoolExecutor(1, thread_name_prefix="datagen-sink")
        if hasattr(self.backend, "observe_headers"):
            self.backend.observe_headers = self.limiter.observe
        queue: asyncio.Queue[WorkItem | None] = asyncio.Queue(maxsize=2 * concurrency)
        self._sink_wakeup = asyncio.Event()
        self._sink_room = asyncio.Semaphore(4 * concurrency)  # bounds outcomes waiting for the sink
        try:
            await loop.run_in_executor(sink_thread, self.sink.open)
            sink_task = asyncio.create_task(self._drain_sink(loop, sink_thread))
            workers = [asyncio.create_task(self._worker(queue)) for _ in range(concurrency)]
            try:
                await self._feed(loop, feed_thread, queue, concurrency)
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                self._closing = True
                self._sink_wakeup.set()
                await sink_task
        finally:
            # Whatever was received but not yet stored is stored now, even on Ctrl-C or an error.
            if self._pending:
                batch, self._pending = self._pending, []
                await loop.run_in_executor(sink_thread, self.sink.handle_batch, batch)
            await loop.run_in_executor(sink_thread, self.sink.close)
            await loop.run_in_executor(feed_thread, self.feeder.close)
            feed_thread.shutdown(wait=False)
            sink_thread.shutdown(wait=False)
            self.stats.elapsed_s = time.perf_counter() - started
            self.stats.rate_limited_s = self.limiter.waited_s
        if self.fatal:
            raise self.fatal[0]
        return self.stats

    async def _feed(self, loop, feed_thread, queue: asyncio.Queue, concurrency: int) -> None:
        exhausted = False
        while not exhausted and not self.fatal:
            items, skipped, exhausted = await loop.run_in_executor(feed_thread, self.feeder.next_chunk, FEED_CHUNK)
            if skipped:
                self._emit(Outcome(None, skipped=skipped))
            for item in items:
                if self.fatal:
                    break
                await queue.put(item)
        for _ in range(concurrency):
            await queue.put(None)

    def _emit(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._sink_wakeup.set()

    async def _drain_sink(self, loop, sink_thread) -> None:
        while True:
            await self._sink_wakeup.wait()
            self._sink_wakeup.clear()
            if self._pending:
                batch, self._pending = self._pending, []
                await loop.run_in_executor(sink_thread, self.sink.handle_batch, batch)
                for outcome in batch:
                    if outcome.item is not None:  # skip counts never took a slot
                        self._sink_room.release()
            if self._closing and not self._pending:
                return

    async def _worker(self, queue: asyncio.Queue) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            if self.fatal:
                continue
            await self._sink_room.acquire()
            if item.cached is not None:
                self._emit(Outcome(item, item.cached))
                continue
            reserved = 0.0
            if self.budget is not None:
                got = self.budget.reserve(item.prompt_tokens_est, item.request.params.max_tokens)
                if got is None:
                    self._emit(Outcome(item, failure="budget"))
                    continue
                reserved = got
            attempts = 0
            try:
                completion, attempts = await self._request(item)
            except VisinstructError as exc:
                self.fatal.append(exc)
                self._sink_room.release()
                continue
            except Exception as exc:  # retries exhausted, or a backend bug: this item fails, the run goes on
                if self.budget is not None:
                    self.budget.settle(reserved, 0.0)
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                self._emit(Outcome(item, failure=reason, attempts=getattr(exc, "attempts", 1)))
                continue
            if self.budget is not None:
                self.budget.settle(reserved, self.price.cost(completion.prompt_tokens, completion.completion_tokens))
            self._emit(Outcome(item, completion, fresh=True, attempts=attempts))

    async def _request(self, item: WorkItem) -> tuple[Completion, int]:
        """One completion with the limiter and retries; raises the last error when retries run out."""
        config, stats = self.config, self.stats
        reserve_tokens = item.prompt_tokens_est + item.request.params.max_tokens
        retrying = AsyncRetrying(
            stop=stop_after_attempt(config.max_retries + 1),
            wait=_wait_for(config),
            retry=retry_if_exception_type(TransientError),
            reraise=True,
        )
        attempt_no = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempt_no = attempt.retry_state.attempt_number
                    if attempt_no > 1:
                        stats.retries += 1
                    await self.limiter.acquire(reserve_tokens)
                    stats.requests += 1
                    try:
                        completion = await self.backend.complete(item.request)
                    except RateLimitedError as exc:
                        self.limiter.pause(exc.retry_after if exc.retry_after is not None else 1.0)
                        raise
                    except EndpointUnreachableError as exc:
                        if self.successes == 0 and attempt_no >= UNREACHABLE_ATTEMPTS:
                            raise VisinstructError(
                                f"cannot reach the endpoint ({exc.reason})", "start the server or fix --base-url"
                            ) from None
                        raise
                    self.successes += 1
                    self.limiter.settle_tokens(reserve_tokens, completion.prompt_tokens + completion.completion_tokens)
                    return completion, attempt_no
        except TransientError as exc:
            exc.reason = f"{exc.reason} (gave up after {attempt_no} attempts)"
            exc.attempts = attempt_no
            raise
        raise AssertionError("unreachable")  # tenacity either returns or raises


async def run_generation(
    job: Job,
    backend: Backend,
    records: Iterable[ImageRecord],
    on_progress: ProgressFn | None = None,
    done: set[str] | None = None,
) -> RunStats:
    """Generate samples for `records` not already in the output, writing each as it completes.

    `done`: ids already in the output or its rejects file, if the caller has read them already.
    """
    return await GenerationRun(job, backend, records, on_progress, done).run()


def write_manifest(out: Path, settings: dict[str, Any], stats: RunStats) -> None:
    """Append this run's settings and results to the manifest log beside the output."""
    entry = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **settings, "stats": asdict(stats)}
    with open(runs_path(out), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
