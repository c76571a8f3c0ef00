"""`datagen generate`: the local executor (live engine) over one or more splits, or a dry run of the same preparation."""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from datagen.cli.common import make_backend, print_summary, select_ids
from datagen.cli.progress import format_usd, run_progress
from datagen.cli.options import (
    COST, ENGINE, EXECUTOR, AbsentObjectsOpt, BackendOpt, BaseUrlOpt, CacheOpt, CocoRootOpt, CocoSplitOpt, CooccurrenceFromOpt, ImageIdsOpt, LimitOpt, MaxTokensOpt,
    ModelOpt, NoCacheOpt, PromptsDirOpt, RepetitionPenaltyOpt, NoRepeatNgramOpt, CandidatesOpt, SeedOpt, ShardOpt, SplitsOpt, TemperatureOpt, TopPOpt,
    TransportOpt, build,
)
from datagen.backends.base import Backend
from datagen.coco import CocoIndex
from datagen.context import DEFAULT_ABSENT_OBJECTS, ContextBuilder, context_builder
from datagen.engine.cost import load_prices
from datagen.engine.tokens import PromptTokenCounter
from datagen.engine.judging import Judge
from datagen.engine.work import AlreadyDone, Endpoint, RequestPlanner, RunStats
from datagen.errors import VisinstructError
from datagen.escaping import echo
from datagen.executors.local import make_judge, run_local
from datagen.outputs import locked_outputs
from datagen.prompts import load_prompt_set
from datagen.run_config import DEFAULT_MAX_TOKENS, BackendName, ExecutorName, GenerateConfig, SourceOptions, Transport
from datagen.sample import sample_id
from datagen.sink import write_manifest
from datagen.task import LlavaTask


def generate(
    split: SplitsOpt,
    coco_root: CocoRootOpt,
    coco_split: CocoSplitOpt = "val2017",
    out: Annotated[Optional[Path], typer.Option(
        help="Output JSONL of a single --split (appended); default <out-dir>/<split>.jsonl.")] = None,
    out_dir: Annotated[Path, typer.Option(
        help="Folder of the outputs: <split>.jsonl per split (<split>.shard-K-of-N.jsonl for --shard).")] = Path("data"),
    limit: LimitOpt = None,
    image_ids: ImageIdsOpt = None,
    backend: BackendOpt = BackendName.auto,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.95,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    seed: SeedOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    no_repeat_ngram_size: NoRepeatNgramOpt = 0,
    candidates: CandidatesOpt = 1,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Local backend: prompts per forward pass (shared by every --split of the run).")] = 8,
    prompts_dir: PromptsDirOpt = None,
    concurrency: Annotated[Optional[int], typer.Option(
        min=1, rich_help_panel=ENGINE,
        help="Requests in flight per split (default 64 for openai; 256+ suits vLLM; local: --batch-size).")] = None,
    rpm: Annotated[Optional[float], typer.Option(
        min=1, rich_help_panel=ENGINE, help="Requests-per-minute budget (tightened by x-ratelimit headers).")] = None,
    tpm: Annotated[Optional[float], typer.Option(
        min=1, rich_help_panel=ENGINE, help="Tokens-per-minute budget (prompt + max-tokens reserved).")] = None,
    max_retries: Annotated[int, typer.Option(
        min=0, rich_help_panel=ENGINE, help="Retries per item on 429/5xx/timeouts/resets; then it is recorded as failed.")] = 6,
    timeout: Annotated[float, typer.Option(
        min=0.1, rich_help_panel=ENGINE, help="Seconds per request before it counts as a timeout.")] = 120.0,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    transport: TransportOpt = Transport.direct,
    shard: ShardOpt = None,
    budget: Annotated[Optional[float], typer.Option(
        min=0, rich_help_panel=COST, help="Stop starting requests before the run's spend could pass this many USD.")] = None,
    prices: Annotated[Optional[Path], typer.Option(
        rich_help_panel=COST, help="YAML/JSON price table merged over the shipped one.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", rich_help_panel=COST, help="Count prompt tokens and print the estimated cost; send nothing.")] = False,
    executor: Annotated[ExecutorName, typer.Option(
        rich_help_panel=EXECUTOR, help="local (this machine) or ray (Ray Data; needs the ray extra).")] = ExecutorName.local,
    ray_address: Annotated[Optional[str], typer.Option(
        rich_help_panel=EXECUTOR, help="Ray cluster to join, e.g. auto or 10.0.0.1:6379 (default: a local Ray).")] = None,
    absent_objects: AbsentObjectsOpt = DEFAULT_ABSENT_OBJECTS,
    cooccurrence_from: CooccurrenceFromOpt = None,
) -> None:
    """Generate samples of one or more splits, each appended to its JSONL file (resumable: rerun the same command).

    Several --split options share one model load; the local model batches their requests together.
    """
    splits = list(dict.fromkeys(split))
    if out is not None and len(splits) > 1:
        raise VisinstructError(f"--out names one file but {len(splits)} splits were given",
                               "drop --out to write <out-dir>/<split>.jsonl per split, or pass a single --split")
    config = build(
        GenerateConfig,
        source=dict(split=splits[0], coco_root=coco_root, coco_split=coco_split, limit=limit, image_ids=image_ids,
                    shard=shard, prompts_dir=prompts_dir, absent_objects=absent_objects,
                    cooccurrence_from=cooccurrence_from),
        model=dict(backend=backend, model=model, base_url=base_url),
        sampling=dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                      repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                      candidates=candidates),
        cache=dict(cache=cache, no_cache=no_cache),
        live=dict(batch_size=batch_size, concurrency=concurrency, rpm=rpm, tpm=tpm, max_retries=max_retries,
                  timeout=timeout, transport=transport, budget=budget, prices=prices),
        executor=dict(executor=executor, ray_address=ray_address),
        out=out, out_dir=out_dir, dry_run=dry_run,
    )
    run_generate_splits([config.for_split(s.value) for s in splits], command="datagen " + shlex.join(sys.argv[1:]))


def open_source(config: GenerateConfig) -> tuple[CocoIndex, list[int]]:
    """The COCO index and the run's image ids (unknown ids fail here, before any model loads)."""
    source = config.source
    index = CocoIndex(source.coco_root, source.coco_split, with_instances=LlavaTask.needs_boxes(source.split.value))
    return index, select_ids(index, source.image_ids, source.limit, source.shard_spec)


def split_context(source: SourceOptions, index: CocoIndex, seed: int) -> ContextBuilder:
    """What the writer sees for the split (negative: absent objects chosen by co-occurrence, stable for a seed)."""
    return context_builder(source.split.value, index, source.cooccurrence_from, seed, source.absent_objects)


@dataclass
class SplitRun:
    """One split of a run: its config, task, images and what earlier runs already wrote."""

    config: GenerateConfig
    task: LlavaTask
    index: CocoIndex
    ids: list[int]
    prompt_hash: str
    done: set[str] = field(default_factory=set)

    @property
    def split(self) -> str:
        return self.task.split

    @property
    def finished(self) -> bool:
        return all(sample_id(i) in self.done for i in self.ids)


def prepare_split(config: GenerateConfig) -> SplitRun:
    """Prompts, COCO index, image ids and task of one split (every user error surfaces here, before a model loads)."""
    split = config.source.split.value
    prompts = load_prompt_set(config.source.prompts_dir, split)
    index, ids = open_source(config)
    task = LlavaTask(split, prompts, config.sampling.params(), provenance={"backend": config.model.backend_name()},
                     context=split_context(config.source, index, config.sampling.seed))
    return SplitRun(config, task, index, ids, prompts.hash)


def run_generate(config: GenerateConfig, command: str | None = None) -> None:
    """Run (or dry-run) one configured split and write its manifest."""
    run_generate_splits([config], command)


def run_generate_splits(configs: list[GenerateConfig], command: str | None = None) -> None:
    """Run (or dry-run) one or more splits that differ only in their split, with one backend (one model load).

    With the local executor the splits run side by side on one event loop, so the local model's batches
    mix them; each split keeps its own output files, near-duplicate gate and manifest entry, written when
    that split finishes. command: the exact command line, recorded in each manifest entry.
    """
    runs = [prepare_split(config) for config in configs]
    if configs[0].dry_run:
        for run in runs:
            print_dry_run(run.config, run.task, run.index, run.ids)
        return
    # Each split's output is locked from before its done ids are read (which cuts a half-written tail) until
    # its manifest is written: a second run on one of them stops here, naming the holder.
    with locked_outputs([run.config.layout().samples for run in runs]):
        _run_locked(runs, configs, command)


def _run_locked(runs: list[SplitRun], configs: list[GenerateConfig], command: str | None) -> None:
    pending = []
    for run in runs:
        run.done = run.config.layout().done_ids()
        if run.finished:
            # A finished run's rerun: say so without loading a model or opening a connection.
            echo(f"{run.split}: all {len(run.ids)} images already done in {run.config.layout().samples} "
                 "(and its rejects file); nothing to generate")
        else:
            pending.append(run)
    if not pending:
        return
    config = configs[0]
    if config.executor.executor is ExecutorName.ray:
        for run in pending:  # one Ray run per split (the workers load the model per run)
            stats = run_on_ray(run.config, run.task, run.index, run.ids, run.done)
            write_manifest(run.config.layout(), manifest(
                run.config, images=len(run.ids), prompt_hash=run.prompt_hash, backend=config.model.backend_name(),
                model=config.model.model_name(), concurrency=config.live.concurrency,
                cache=run.config.engine_config().cache_path, command=command), stats)
            print_summary(run.split, run.config.layout(), stats, config.live.budget)
        return
    run_local_splits(pending, command)


def open_backend(config: GenerateConfig, splits: list[str]) -> Backend:
    """The run's one backend; loading a local model is said on stderr (it takes a while, and happens once per run)."""
    name, live = config.model.backend_name(), config.live
    if name != "local":
        return make_backend(name, config.model.model, config.model.base_url, live.batch_size, live.concurrency,
                            live.timeout, live.transport)
    echo(f"model: loading local {config.model.model_name()} once for {', '.join(splits)}")
    started = time.perf_counter()
    backend = make_backend(name, config.model.model, config.model.base_url, live.batch_size, live.concurrency,
                           live.timeout, live.transport)
    echo(f"model: loaded in {time.perf_counter() - started:.1f} s")
    return backend


def run_local_splits(runs: list[SplitRun], command: str | None) -> None:
    """The local executor over every split at once: one backend, one event loop, a manifest entry per split."""
    config = runs[0].config
    backend = open_backend(config, [run.split for run in runs])
    concurrency = config.live.concurrency or backend.preferred_concurrency
    # Judges before the progress display's thread: a worker-process judge forks when it is made.
    judges = [make_judge(run.task, concurrency) for run in runs]
    progress = run_progress({run.split: len(run.ids) for run in runs})
    finished: list[tuple[SplitRun, RunStats]] = []

    async def one(run: SplitRun, judge: Judge) -> None:
        layout, engine_config = run.config.layout(), run.config.engine_config()
        stats = await run_local(run.task, layout, backend, run.index.records(run.ids), engine_config, concurrency,
                                progress.callback(run.split), run.done, judge)
        write_manifest(layout, manifest(run.config, images=len(run.ids), prompt_hash=run.prompt_hash,
                                        backend=backend.name, model=backend.model, concurrency=concurrency,
                                        cache=engine_config.cache_path, command=command), stats)
        finished.append((run, stats))

    async def run_all() -> None:
        try:
            await asyncio.gather(*(one(run, judge) for run, judge in zip(runs, judges)))
        finally:
            await backend.aclose()

    try:
        with progress:
            asyncio.run(run_all())
    finally:
        # Summaries after the bars are gone (they share the terminal); in the order the splits were given.
        order = {run.split: k for k, run in enumerate(runs)}
        for run, stats in sorted(finished, key=lambda pair: order[pair[0].split]):
            print_summary(run.split, run.config.layout(), stats, config.live.budget)


def run_on_ray(config: GenerateConfig, task: LlavaTask, index: CocoIndex, ids: list[int], done: set[str]):
    """The same run on Ray Data (datagen.executors.ray_executor); the stats as a local run reports them."""
    try:
        from datagen.executors.ray_executor import BackendSpec, run_ray  # imports ray: only for --executor ray
    except ImportError as exc:
        raise VisinstructError(f"--executor ray needs Ray Data ({exc})", "pip install -e '.[ray]'") from None
    from datagen.backends.openai_backend import DEFAULT_CONCURRENCY  # the openai SDK is slow to import

    live, backend_name = config.live, config.model.backend_name()
    spec = BackendSpec(backend_name, config.model.model_name(), config.model.base_url or os.environ.get("OPENAI_BASE_URL"),
                       live.batch_size, live.timeout, live.transport)
    concurrency = live.concurrency or (live.batch_size if backend_name == "local" else DEFAULT_CONCURRENCY)
    progress = run_progress({task.split: len(ids)})
    with progress:
        run = run_ray(task, config.layout(), spec, index.records(ids), config.engine_config(), concurrency,
                      progress.callback(task.split), done, config.executor.ray_address)
    timings = run.timings
    peaks = timings.worker_peak_rss_mb
    memory = f"; peak RSS per worker up to {max(peaks.values()):.0f} MB" if peaks else ""
    echo(f"ray: {timings.workers} worker(s); start-up {timings.connect_s + timings.first_request_after_s:.1f}s "
         f"(cluster {timings.connect_s:.1f}s), then {timings.work_s:.1f}s of work{memory}")
    return run.stats


def manifest(config: GenerateConfig, **resolved: Any) -> dict[str, Any]:
    """The manifest entry: the config as given, plus what it resolved to (backend, model, images, ...)."""
    dumped = config.model_dump(mode="json")
    # `shard` and `images` at the top level: `datagen merge` reads them to find missing shards and images.
    return {"shard": config.source.shard, **{k: (str(v) if isinstance(v, Path) else v) for k, v in resolved.items()},
            "config": dumped}


def print_dry_run(config: GenerateConfig, task: LlavaTask, index: CocoIndex, ids: list[int]) -> None:
    """Count the prompt tokens of every pending request and price the run; sends nothing."""
    split, layout, params = task.split, config.layout(), task.params
    backend_name, model_name = config.model.backend_name(), config.model.model_name()
    engine_config = config.engine_config()
    counter = PromptTokenCounter()
    planner = RequestPlanner(task, Endpoint(backend_name, model_name), layout.done_ids(repair=False), engine_config.cache_path,
                             counter.count)
    pending = cached = already = prompt_tokens = 0
    planner.open()
    try:
        for item in planner.plan(index.records(ids)):
            if isinstance(item, AlreadyDone):
                already += item.count
            elif item.cached is not None:
                cached += 1
            else:
                pending += 1
                prompt_tokens += item.prompt_tokens_est
    finally:
        planner.close()
    table = load_prices(engine_config.prices_path)
    price = table.lookup(model_name) if backend_name != "local" else None
    worst_out = pending * params.max_tokens
    echo(f"dry run, {split} with {backend_name}:{model_name}: {len(ids)} images, {already} already done, "
         f"{cached} in the cache, {pending} to request")
    echo(f"  prompt tokens: {prompt_tokens:,} (cl100k_base count; {prompt_tokens / max(pending, 1):,.0f} per request)")
    echo(f"  completion tokens: at most {worst_out:,} ({params.max_tokens} per request)")
    if backend_name == "local":
        echo("  cost: $0 (local model)")
    elif price is None:
        echo(f"  cost: unknown, no price for {model_name!r}; pass --prices FILE")
    else:
        low, high = price.cost(prompt_tokens, 0), price.cost(prompt_tokens, worst_out)
        batch = table.batch(price)
        echo(f"  estimated cost: {format_usd(low)} for the prompts + up to {format_usd(high - low)} for completions "
             f"= at most {format_usd(high)} (Batch API: at most {format_usd(batch.cost(prompt_tokens, worst_out))})")
        if engine_config.budget_usd is not None and high > engine_config.budget_usd:
            echo(f"  note: --budget {format_usd(engine_config.budget_usd)} may stop the run before it finishes")


def register(app: typer.Typer) -> None:
    app.command()(generate)
