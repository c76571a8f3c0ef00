"""The Ray Data executor: the same task, engine request path and sink as a local run, over a Ray cluster.

    driver   RequestPlanner, in a thread of its own (the first window is planned while Ray starts): skip done
             ids, prepare (render + messages), cache key, cache lookup -> work items in chunks (a Ray Dataset,
             one chunk per row)
    workers  an actor pool (`EngineStage`): per item the engine's request path (client, retries, error
             classes), the job-wide limiter/budget actor, then `task.judge` (parse + per-sample checks);
             each fresh completion stored (see below) before its result is handed on
    driver   ResultRecorder -> OutputSink: counts, cost, near-duplicates in run order, the output files

Design choices (docs/ray.md says more):
- One response cache, the SQLite file of a local run, on the driver's node. The driver reads it while
  planning (cached items carry their completion and skip the LLM); a worker stores each fresh completion
  as it comes, in group commits (`ray_store`: into the file itself on the driver's node, through a
  `CacheWriter` actor there from other nodes), and looks its chunk up before sending: so a crash of the
  driver or a worker pays again only for the requests in flight and the completions of the last commit
  interval, also when Ray runs a dead worker's chunk again.
- --rpm/--tpm/--budget are enforced for the whole job by one `JobLimiter` actor that every worker asks
  before each request; without them each worker keeps a local limiter (429 pauses, x-ratelimit headers).
- A killed driver: workers on its node check before each request that it still runs (`DriverProcess`), so
  only requests already on their way arrive afterwards; elsewhere Ray stops the job's actors once it notices.
- The sink decides near-duplicates in the run's order (`seq`), so the result does not depend on which
  worker finishes first: Ray and local runs accept the same samples from the same completions.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import pickle
import resource
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

# This module is the optional [ray] extra's: the CLI imports it only for --executor ray.
import pyarrow as pa
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from datagen.backends.base import Backend
from datagen.coco import ImageRecord
from datagen.engine.config import EngineConfig
from datagen.engine.cost import BudgetGuard, Price
from datagen.engine.heap import settle_worker, steady_heap
from datagen.engine.live import LiveEngine, ProgressFn, ResultRecorder
from datagen.engine.ratelimit import RateLimiter
from datagen.engine.tokens import PromptTokenCounter
from datagen.engine.work import (AlreadyDone, BudgetStopped, Completed, Endpoint, Failed, RequestPlanner, Result,
                                 RunStats, WorkItem)
from datagen.errors import VisinstructError
from datagen.executors.local import price_of
from datagen.executors.ray_items import ChunkResult, DriverProcess, Judged, WorkerVerdicts
from datagen.executors.ray_store import CacheSpec, CacheWriter
from datagen.executors.ray_vllm import vllm_dataset
from datagen.sample import OutputLayout
from datagen.sink import OutputSink
from datagen.task import LlavaTask


PER_WORKER_CONCURRENCY = 128  # requests one openai worker keeps in flight before the pool grows by a worker
CHUNK_MIN = 8  # items per dataset row: one actor call; small chunks spread work, large ones cut overhead
# Each chunk is a Ray Data task, with a fixed CPU cost in the worker and the driver: at c=256 chunks of two shares
# ran as fast as or faster than smaller ones (bench/RESULTS.md, issue 8, sixth session). A worker stores each
# completion as it comes (ray_store.GroupCommit), so a chunk's size does not bound what a crash pays again.
CHUNK_MAX = 512
# Items the driver plans (and holds) per dataset: bounds its memory; each window starts the worker pool again.
WINDOW_ITEMS = 50_000
# Chunks one worker runs at once (on its event loop): while one waits for its slowest request, others send.
# Local-model and vLLM workers compute rather than wait: 4 calls of half a share, so no worker queues much more
# than it can run while another idles.
CALLS_PER_WORKER = 4
# openai workers: chunks of two shares of --concurrency, 3 at once and one queued: a chunk keeps its items until
# its slowest request is answered, so the running calls hold 6 shares and the slots stay full; Ray Data hands the
# queued chunk over as soon as a call returns.
OPENAI_CALLS_PER_WORKER = 3
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests",
                "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")


@dataclass(frozen=True)
class BackendSpec:
    """How to build the backend inside a worker (backends hold sockets or models, so they are not shipped)."""

    name: str  # openai | local | vllm
    model: str
    base_url: str | None = None
    batch_size: int = 8
    timeout: float = 120.0
    transport: str = "direct"

    def preload(self) -> Backend | None:
        """Import (and for the embedded model, load) what the backend needs, at worker start-up rather than in
        the first call; the openai client itself is made later, inside the worker's event loop."""
        if self.name == "local":
            return self.build(self.batch_size)
        import datagen.backends.openai_backend  # noqa: F401

        if self.transport == "direct":
            import aiohttp  # noqa: F401  (imported by the first request otherwise: ~0.15-0.3 s inside the run)
        return None

    def build(self, concurrency: int) -> Backend:
        """The backend, made in the process that uses it."""
        if self.name == "local":
            from datagen.backends.local import LocalBackend  # torch + transformers: only in workers that need them

            return LocalBackend(model=self.model, batch_size=self.batch_size)
        from datagen.backends.openai_backend import OpenAIBackend  # the openai SDK is slow to import

        return OpenAIBackend(model=self.model, base_url=self.base_url, concurrency=concurrency, timeout=self.timeout,
                             transport=self.transport)


@dataclass
class RayTimings:
    """Where a Ray run's time went; start-up is what a cluster pays once, not per request."""

    connect_s: float = 0.0  # ray.init: starting a local cluster, or joining one
    first_request_after_s: float = 0.0  # from the dataset's start to the first worker call (actor pool start)
    # The driver's planning (done ids skipped, requests prepared, keyed, looked up in the cache), in its own thread:
    # the first window's overlaps Ray's start.
    plan_s: float = 0.0
    # From the first worker call to the last result written, plus any wait for the first window's planning once
    # Ray was up (planning that overlapped Ray's start is not work).
    work_s: float = 0.0
    workers: int = 0
    worker_peak_rss_mb: dict[int, float] = field(default_factory=dict)  # worker pid -> its peak RSS (MB)
    driver_peak_rss_mb: float = 0.0


@dataclass
class RayRun:
    """What `run_ray` returns: the run's stats (as a local run's) and its timings."""

    stats: RunStats
    timings: RayTimings = field(default_factory=RayTimings)


class JobLimiter:
    """The job-wide request/token pacing and spending limit: every worker asks it before each request."""

    def __init__(self, rpm: float | None, tpm: float | None, budget_usd: float | None, price: Price | None) -> None:
        self.limiter = RateLimiter(rpm, tpm)
        self.budget = BudgetGuard(budget_usd, price) if budget_usd is not None and price is not None else None

    async def acquire(self, tokens: int) -> None:
        await self.limiter.acquire(tokens)

    def settle_tokens(self, reserved: int, used: int) -> None:
        self.limiter.settle_tokens(reserved, used)

    def pause(self, seconds: float) -> None:
        self.limiter.pause(seconds)

    def observe(self, headers: dict[str, str]) -> None:
        self.limiter.observe(headers)

    def reserve(self, prompt_tokens: int, max_tokens: int) -> float | None:
        return self.budget.reserve(prompt_tokens, max_tokens) if self.budget is not None else 0.0

    def settle(self, reserved: float, actual_usd: float) -> None:
        if self.budget is not None:
            self.budget.settle(reserved, actual_usd)

    def waited_s(self) -> float:
        return self.limiter.waited_s


class RemoteLimiter:
    """The RateLimiter interface the engine calls, answered by the job's `JobLimiter` actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.waited_s = 0.0

    async def acquire(self, tokens: int = 0) -> None:
        started = time.monotonic()
        await self.actor.acquire.remote(tokens)
        self.waited_s += time.monotonic() - started

    def settle_tokens(self, reserved: int, used: int) -> None:
        self.actor.settle_tokens.remote(reserved, used)  # fire and forget: nothing waits on the correction

    def pause(self, seconds: float) -> None:
        self.actor.pause.remote(seconds)

    def observe(self, headers: Mapping[str, str]) -> None:
        found = {name: headers[name] for name in RATE_HEADERS if name in headers}
        if found:  # most answers carry none; those that do tell the whole job
            self.actor.observe.remote(found)


class EngineStage:
    """The LLM stage on a Ray worker: the engine's request path per item, then the task's judgement.

    Ray Data makes one per actor and calls it with dataset batches (Arrow tables) of pickled work-item chunks;
    the calls run concurrently on the actor's event loop, `concurrency` requests in flight at most.
    """

    def __init__(self, task: LlavaTask, spec: BackendSpec, config: EngineConfig, price: Price | None,
                 concurrency: int, endpoint: Endpoint, limiter: Any | None, cache: CacheSpec | None,
                 driver: DriverProcess | None = None) -> None:
        settle_worker()  # an actor's process judges for the job's lifetime (datagen.engine.heap)
        node_id = ray.get_runtime_context().get_node_id()
        # On the driver's node: no request is sent once the driver is gone (see DriverProcess).
        self.driver = driver.watch() if driver is not None and driver.watch_from(node_id) else None
        self.task = task
        self.spec = spec
        # Budget and pacing are the job's (the JobLimiter actor), not this worker's.
        self.config = replace(config, budget_usd=None, cache_path=None)
        self.price = price
        self.concurrency = max(1, concurrency)
        self.endpoint = endpoint
        self.limiter = limiter
        self.store = cache.store(node_id) if cache is not None else None
        self.backend = spec.preload()
        self.engine: LiveEngine | None = None
        self.slots: asyncio.Semaphore | None = None
        self.reported_requests = self.reported_retries = 0
        self.fatal: VisinstructError | None = None

    def _start(self) -> LiveEngine:
        """The backend and engine, made on first use inside the actor's running event loop."""
        backend = self.backend or self.spec.build(self.concurrency)
        engine = LiveEngine(backend, self.config, self.concurrency, self.price)
        if self.limiter is not None and self.config_limits():
            engine.limiter = RemoteLimiter(self.limiter)
            backend.observe_headers = engine.limiter.observe
        self.slots = asyncio.Semaphore(self.concurrency)
        return engine

    def config_limits(self) -> bool:
        """Whether the job paces requests (--rpm/--tpm); the limiter actor may exist for --budget alone."""
        return bool(self.config.rpm or self.config.tpm)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        started_at = time.time()
        if self.engine is None:
            self.engine = self._start()
        outputs = []
        for blob in batch.column("items").to_pylist():
            items: list[WorkItem] = pickle.loads(blob)
            if self.store is not None:
                items = await self._stored_before(items)
            # None: not handed on, because the run is stopping (a fatal error); the rerun does it.
            results = [r for r in await asyncio.gather(*(self._one_judged(item) for item in items)) if r is not None]
            outputs.append(pickle.dumps(self._chunk_result(results, started_at)))
        return result_table(outputs)

    async def _stored_before(self, items: list[WorkItem]) -> list[WorkItem]:
        """The chunk with the completions already in the cache attached (see GroupCommit.attach_stored); if the
        cache cannot be read, the run stops before any of the chunk's requests."""
        try:
            return await self.store.attach_stored(items)
        except VisinstructError as exc:
            self.fatal = self.fatal or exc
            return []

    def _chunk_result(self, results: list[Result], started_at: float) -> ChunkResult:
        stats = self.engine.stats
        chunk = ChunkResult(results, stats.requests - self.reported_requests, stats.retries - self.reported_retries,
                            started_at, self.fatal, os.getpid(), peak_rss_mb())
        self.reported_requests, self.reported_retries = stats.requests, stats.retries
        return chunk

    def _judged(self, result: Result) -> Result:
        """The result with its work item slimmed to the id and the verdict (what the driver needs)."""
        item = result.item
        verdict = self.task.judge(item.prepared, result.completion) if isinstance(result, Completed) else None
        slim = WorkItem(item.seq, Judged(item.item_id, verdict), item.key)
        if isinstance(result, Completed):
            return Completed(slim, result.completion, result.fresh, result.attempts)
        if isinstance(result, Failed):
            return Failed(slim, result.reason, result.attempts)
        return BudgetStopped(slim)

    async def _one_judged(self, item: WorkItem) -> Result | None:
        """`_one`, judged as soon as its completion is here (so the chunk's judging is spread over its requests
        rather than done after the slowest one). A fresh completion is stored before its result is handed on: one
        whose store fails is dropped, verdict too, rather than written as a sample the cache does not know was
        paid for (and the run stops)."""
        result = await self._one(item)
        if result is None:
            return None
        judged = self._judged(result)
        if self.store is not None and isinstance(result, Completed) and result.fresh:
            try:
                await self.store.put((item.key, self.endpoint.backend, self.endpoint.model, item.request.key,
                                      result.completion))
            except VisinstructError as exc:  # the cache cannot be written (a full disk, say)
                self.fatal = self.fatal or exc
                return None
        return judged

    async def _one(self, item: WorkItem) -> Result | None:
        """One item: cached, or budget-checked and requested with the engine's retries; None once the run stops."""
        if item.cached is not None:
            return Completed(item, item.cached, fresh=False)
        async with self.slots:
            if self.fatal is not None or (self.driver is not None and not self.driver.alive()):
                return None
            reserved = 0.0
            if self.limiter is not None:
                got = await self.limiter.reserve.remote(item.prompt_tokens_est, item.request.params.max_tokens)
                if got is None:
                    return BudgetStopped(item)
                reserved = got
            try:
                completion, attempts = await self.engine._request(item)
            except VisinstructError as exc:  # the user must fix something: the run stops
                self.fatal = exc
                self._settle(reserved, 0.0)
                return None
            except Exception as exc:  # retries exhausted, or a backend bug: this item fails, the run goes on
                self._settle(reserved, 0.0)
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                return Failed(item, reason, getattr(exc, "attempts", 1))
            cost = self.price.cost(completion.prompt_tokens, completion.completion_tokens) if self.price else 0.0
            self._settle(reserved, cost)
            return Completed(item, completion, fresh=True, attempts=attempts)

    def _settle(self, reserved: float, cost: float) -> None:
        if self.limiter is not None:
            self.limiter.settle.remote(reserved, cost)


def result_table(blobs: list[bytes]) -> pa.Table:
    """A stage's output: one binary column of pickled chunk results. Arrow in and out, so Ray Data builds its
    blocks without converting through numpy object arrays."""
    return pa.table({"result": pa.array(blobs, type=pa.binary())})


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def connect(address: str | None, num_cpus: int | None = None) -> tuple[bool, float]:
    """Join the cluster at `address` (or start a local one); whether this call started Ray, and how long it took."""
    started = time.perf_counter()
    # Ray Data's per-dataset INFO lines (plans, progress) would bury the run's own progress bar and summary.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False, 0.0
    try:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise VisinstructError(f"cannot join the Ray cluster at {address or 'a new local cluster'}: {exc}".splitlines()[0],
                               "start it with `ray start --head` or fix --ray-address") from None
    return True, time.perf_counter() - started


def chunks(planned: Iterable[WorkItem | AlreadyDone], size: int, skipped: list[int]) -> Iterator[list[WorkItem]]:
    """Work items in chunks of `size`, counting already-done records into `skipped[0]`."""
    chunk: list[WorkItem] = []
    for item in planned:
        if isinstance(item, AlreadyDone):
            skipped[0] += item.count
            continue
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def pool_size(backend: str, concurrency: int, cluster_cpus: float, gpus: float = 0.0) -> int:
    """How many workers: openai ones are I/O-bound (one per PER_WORKER_CONCURRENCY requests, at least two
    when the cluster has the CPUs); local-model ones are CPU-bound (one per CPU); vLLM engines one per GPU."""
    cpus = max(1, int(cluster_cpus))
    if backend == "local":
        return cpus
    if backend == "vllm":
        return max(1, int(gpus))
    return max(1, min(cpus, max(2, math.ceil(concurrency / PER_WORKER_CONCURRENCY))))


@steady_heap()  # the collector's settings for the driver's run (datagen.engine.heap)
def run_ray(task: LlavaTask, layout: OutputLayout, spec: BackendSpec, records: Iterable[ImageRecord],
            config: EngineConfig, concurrency: int, on_progress: ProgressFn | None = None,
            done: set[str] | None = None, address: str | None = None, num_cpus: int | None = None,
            window: int = WINDOW_ITEMS, writer_only: bool = False) -> RayRun:
    """Generate `task` samples for `records` not already in the output, on Ray; the same files as `run_local`.

    The driver plans `window` items at a time and runs one dataset per window (the sink's order carries on).
    """
    if spec.name == "vllm" and (config.rpm or config.tpm or config.budget_usd is not None):
        raise VisinstructError("--rpm, --tpm and --budget pace an endpoint; --backend vllm runs its own engines",
                               "drop them, or serve the model with `vllm serve` and use --backend openai")
    price = price_of(spec.name, spec.model, config)
    if config.budget_usd is not None and price is None:
        raise VisinstructError(f"no price known for model {spec.model!r}, so --budget cannot be enforced",
                               "add the model to a price file and pass --prices FILE")
    count_tokens = None
    if config.tpm or config.budget_usd is not None:
        count_tokens = PromptTokenCounter().count
    done = layout.done_ids() if done is None else done
    job = RayJob(task, layout, spec, config, concurrency, price, on_progress, writer_only)
    timings = RayTimings()
    planner = RequestPlanner(task, job.endpoint, done, config.cache_path, count_tokens)
    # Planning (skip done ids, render, key, look up the cache) runs in a thread of its own, which also owns the
    # planner's cache connection: the first window is planned while Ray starts (`connect` waits on processes).
    planning = WindowPlanner(planner, records, window, timings)
    started_ray = False
    try:
        started_ray, timings.connect_s = connect(address, num_cpus)
        return _run_windows(job, timings, planning, started_ray)
    finally:
        planning.close()
        if started_ray:
            ray.shutdown()


@dataclass(frozen=True)
class RayJob:
    """What `run_ray` was asked to do, fixed for the run.

    `writer_only`: every worker stores through the cache writer actor, the driver's node's too (tests take the
    other nodes' path on one machine).
    """

    task: LlavaTask
    layout: OutputLayout
    spec: BackendSpec
    config: EngineConfig
    concurrency: int
    price: Price | None
    on_progress: ProgressFn | None = None
    writer_only: bool = False

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.spec.name, self.spec.model)


class WindowPlanner:
    """The driver's planning in one thread: windows of planned items, the next one asked for while a run starts."""

    def __init__(self, planner: RequestPlanner, records: Iterable[ImageRecord], window: int,
                 timings: RayTimings) -> None:
        self.planner = planner
        self.window = window
        self.timings = timings
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="visinstruct-plan")
        self.planned = self.thread.submit(self._open, records)
        self.next = self.thread.submit(self._window)

    def _open(self, records: Iterable[ImageRecord]) -> Iterator[WorkItem | AlreadyDone]:
        self.planner.open()
        return self.planner.plan(records)

    def _window(self) -> list[WorkItem | AlreadyDone]:
        started = time.perf_counter()
        try:
            return list(islice(self.planned.result(), self.window))
        finally:
            self.timings.plan_s += time.perf_counter() - started

    def take(self) -> list[WorkItem | AlreadyDone]:
        """The next window (empty once the records are all planned). Only the first is planned ahead: a window
        planned during the previous one's run would double what the driver holds."""
        if self.next is None:
            return self.thread.submit(self._window).result()
        first, self.next = self.next, None
        return first.result()

    def close(self) -> None:
        """Close the planner's connection, in its thread (after the window being planned, if one is)."""
        if self.thread is None:
            return
        thread, self.thread = self.thread, None
        try:
            thread.submit(self.planner.close).result()
        finally:
            thread.shutdown()


def _run_windows(job: RayJob, timings: RayTimings, planning: WindowPlanner, started_ray: bool) -> RayRun:
    """`run_ray` once Ray is up: one dataset per window of planned items, through the job's actors."""
    task, layout, spec, config, price, endpoint = job.task, job.layout, job.spec, job.config, job.price, job.endpoint
    concurrency = job.concurrency
    stats = RunStats(cost_usd=0.0 if price is not None else None)
    # A cluster that was joined may have (or gain) other nodes, whose workers store through the writer actor; the
    # one-machine cluster started here has none.
    writer = job.writer_only or not started_ray
    resources = ray.cluster_resources()
    workers = pool_size(spec.name, concurrency, resources.get("CPU", 1), resources.get("GPU", 0))
    # Local-model workers each batch --batch-size prompts; openai workers share --concurrency between them.
    per_worker = spec.batch_size if spec.name == "local" else max(1, math.ceil(concurrency / workers))
    timings.workers = workers
    node_id = ray.get_runtime_context().get_node_id()
    here = NodeAffinitySchedulingStrategy(node_id, soft=False)
    driver = DriverProcess.this_process(node_id)
    cache_writer = limiter = cache = None
    if config.cache_path is not None and spec.name != "vllm":
        Path(config.cache_path).parent.mkdir(parents=True, exist_ok=True)
        if writer:
            cache_writer = ray.remote(CacheWriter).options(num_cpus=0, scheduling_strategy=here).remote(
                str(config.cache_path))
        cache = CacheSpec(str(config.cache_path), node_id, cache_writer, job.writer_only)
    if config.rpm or config.tpm or config.budget_usd is not None:
        limiter = ray.remote(JobLimiter).options(num_cpus=0, scheduling_strategy=here).remote(
            config.rpm, config.tpm, config.budget_usd, price)
    sink = OutputSink(layout, task.split, stats, task.near_duplicate_gate(layout.samples))
    # The workers stored fresh completions already; the recorder counts, hands on verdicts and writes files.
    # vLLM's pipeline has no cache writer: the recorder stores its fresh completions as they arrive.
    recorder = ResultRecorder(WorkerVerdicts(), sink, stats, endpoint, price,
                              config.cache_path if spec.name == "vllm" else None, job.on_progress)
    clock = time.perf_counter()
    skipped = [0]
    # Enough chunks in a worker to keep its share of --concurrency busy; openai workers' chunks are two shares,
    # at most CHUNK_MAX items: few tasks, their calls hold 6 shares.
    if spec.name == "openai":
        calls, queued = OPENAI_CALLS_PER_WORKER, 1
        chunk_size = max(CHUNK_MIN, min(CHUNK_MAX, 2 * per_worker))
    else:
        calls, queued = CALLS_PER_WORKER, CALLS_PER_WORKER
        chunk_size = max(CHUNK_MIN, math.ceil(2 * per_worker / CALLS_PER_WORKER))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own
    ctx.print_on_execution_start = False
    # Workers spread over the nodes (so each can use its own node's endpoint, --base-url http://localhost...) by
    # Ray Data's own scheduling: its actor pools spread by default. Asking for it per call (ray_remote_args_fn)
    # or in the context is deprecated as of Ray 2.60; tests/test_ray_executor.py fails on such warnings.
    fatal: VisinstructError | None = None
    first_call = dataset_started = None
    plan_wait_s = 0.0
    recorder.open()
    try:
        while fatal is None:
            # One window of planned items at a time: the driver holds a window, not the whole run.
            waited = time.perf_counter()
            rows = [{"items": pickle.dumps(chunk)} for chunk in chunks(planning.take(), chunk_size, skipped)]
            if first_call is None:  # the first window's planning, beyond what overlapped Ray's start, is work
                plan_wait_s += time.perf_counter() - waited
            if skipped[0]:
                recorder.record([AlreadyDone(skipped[0])])
                skipped[0] = 0
            if not rows:
                break
            if spec.name == "vllm":
                dataset = vllm_dataset(rows, task, spec, workers)
            else:
                dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                    EngineStage, batch_size=1, batch_format="pyarrow",
                    fn_constructor_args=(task, spec, config, price, per_worker, endpoint, limiter, cache,
                                         driver),
                    compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows)),  # no idle model loads
                                                       max_concurrent_calls_per_actor=calls,
                                                       max_tasks_in_flight_per_actor=calls + queued),
                    num_cpus=1 if spec.name == "local" else 0.5,
                )
            dataset_started = dataset_started or time.time()
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for blob in batch.column("result").to_pylist():
                    chunk: ChunkResult = pickle.loads(blob)
                    first_call = chunk.started_at if first_call is None else min(first_call, chunk.started_at)
                    stats.requests += chunk.requests
                    stats.retries += chunk.retries
                    if chunk.worker_pid:
                        peaks = timings.worker_peak_rss_mb
                        peaks[chunk.worker_pid] = max(peaks.get(chunk.worker_pid, 0.0), chunk.worker_peak_rss_mb)
                    recorder.record(chunk.results)
                    fatal = fatal or chunk.fatal
                if fatal is not None:
                    break
        if first_call is not None:
            # Start-up: until the first window's first worker call; later windows' pool starts count as work.
            timings.first_request_after_s = max(0.0, first_call - dataset_started)
            timings.work_s = plan_wait_s + time.time() - first_call
        if limiter is not None:
            stats.rate_limited_s = ray.get(limiter.waited_s.remote())
        timings.driver_peak_rss_mb = peak_rss_mb()
    finally:
        try:
            planning.close()
            recorder.close()  # may fail again after a write error: the actors still go down
        finally:
            stats.elapsed_s = time.perf_counter() - clock
            try:
                if cache_writer is not None:
                    ray.get(cache_writer.close.remote())
            finally:
                for actor in (cache_writer, limiter):
                    if actor is not None:
                        ray.kill(actor)
    if fatal is not None:
        raise fatal
    return RayRun(stats, timings)
