"""The local executor (the default): the live engine over a stream of records, on this machine."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from datagen.backends.base import Backend
from datagen.coco import ImageRecord
from datagen.engine.config import EngineConfig
from datagen.engine.cost import Price, load_prices
from datagen.engine.heap import steady_heap
from datagen.engine.judging import InlineJudge, Judge, ProcessJudge
from datagen.engine.live import LiveEngine, ProgressFn, ResultRecorder
from datagen.engine.tokens import PromptTokenCounter
from datagen.engine.work import Endpoint, RequestPlanner, RunStats
from datagen.sample import OutputLayout
from datagen.sink import OutputSink
from datagen.task import LlavaTask

LOCAL_PRICE = Price(0.0, 0.0)  # the embedded model costs nothing per token
# From this many requests in flight, checks in a worker process pay for its start-up (about a second):
# below it the backend, not the checks, is what a run waits for.
PROCESS_JUDGE_MIN_CONCURRENCY = 64
# Checks cost more CPU per sample than the request itself; past a few processes the event loop is the limit.
MAX_JUDGE_WORKERS = 4


def make_judge(task: LlavaTask, concurrency: int, in_process: bool | None = None, workers: int | None = None) -> Judge:
    """Worker-process judges for fast, concurrent runs with checks; judging in the store thread otherwise."""
    if in_process is None:
        in_process = task.gate and concurrency >= PROCESS_JUDGE_MIN_CONCURRENCY
    if not in_process:
        return InlineJudge(task)
    return ProcessJudge(task, judge_workers() if workers is None else workers)


def judge_workers() -> int:
    """How many judge processes: `$DATAGEN_JUDGE_WORKERS`, else one per CPU this process may use (at most 4)."""
    explicit = os.environ.get("DATAGEN_JUDGE_WORKERS")
    if explicit:
        return max(1, int(explicit))
    return max(1, min(MAX_JUDGE_WORKERS, len(os.sched_getaffinity(0))))


def price_of(backend_name: str, model: str, config: EngineConfig) -> Price | None:
    """The per-token price of the model (None: unknown); the embedded model is free."""
    if backend_name == "local":
        return LOCAL_PRICE
    return load_prices(config.prices_path).lookup(model)


def token_counter(engine: LiveEngine) -> Callable[[list[dict[str, str]]], int] | None:
    """The prompt-token counter when --tpm or --budget need one, else None (tiktoken's encoding loads only then)."""
    if not engine.needs_token_counts:
        return None
    return PromptTokenCounter().count


async def run_local(task: LlavaTask, layout: OutputLayout, backend: Backend, records: Iterable[ImageRecord],
                    config: EngineConfig, concurrency: int, on_progress: ProgressFn | None = None,
                    done: set[str] | None = None, judge: Judge | None = None) -> RunStats:
    """Generate `task` samples for `records` not already in the output, writing each as it is decided.

    `done`: ids already in the output or its rejects file, if the caller has read them already;
    `judge`: where completions are judged (default `make_judge`; closed by the run). A caller that
    starts threads of its own (a progress bar) makes it first, so its worker forks without them.
    """
    endpoint = Endpoint(backend.name, backend.model)
    price = price_of(backend.name, backend.model, config)
    engine = LiveEngine(backend, config, concurrency, price)
    done = layout.done_ids() if done is None else done
    planner = RequestPlanner(task, endpoint, done, config.cache_path, token_counter(engine))
    sink = OutputSink(layout, task.split, engine.stats, task.near_duplicate_gate(layout.samples))
    with steady_heap():  # the collector's settings for a run (datagen.engine.heap); frozen before judges fork
        judge = judge or make_judge(task, concurrency)
        recorder = ResultRecorder(judge, sink, engine.stats, endpoint, price, config.cache_path, on_progress)
        return await engine.run(planner, records, recorder)
