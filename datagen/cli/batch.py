"""`datagen batch submit | status | collect`: the Batch API executor, rerunnable at every step."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.cli.common import format_usd, make_backend, select_ids
from datagen.cli.options import (
    AbsentObjectsOpt, CacheOpt, CocoRootOpt, CocoSplitOpt, CooccurrenceFromOpt, ImageIdsOpt, LimitOpt, MaxTokensOpt, ModelOpt, NoCacheOpt,
    PromptsDirOpt, RepetitionPenaltyOpt, SeedOpt, ShardOpt, SplitOpt, TemperatureOpt, TopPOpt, build,
)
from datagen.coco import CocoIndex
from datagen.context import DEFAULT_ABSENT_OBJECTS
from datagen.engine.batch_api import TERMINAL, BatchState, download_lines, refresh, upload_and_create
from datagen.engine.cost import load_prices
from datagen.engine.work import RunStats
from datagen.errors import VisinstructError
from datagen.escaping import echo, terminal_text
from datagen.executors.batch import (BACKEND, add_request_files, collect_ready, load_state, plan_submit, prompts_of,
                                     read_request_file, task_of)
from datagen.outputs import OutputLock
from datagen.prompts import load_prompt_set
from datagen.run_config import DEFAULT_MAX_TOKENS, BatchSubmitConfig
from datagen.sample import OutputLayout
from datagen.task import LlavaTask

batch_app = typer.Typer(help="Generate through OpenAI's Batch API (half price, results within 24 h).", no_args_is_help=True)

OutOpt = Annotated[Path, typer.Option(help="The output JSONL given to submit.")]


def _client(state: BatchState):
    """The OpenAI client of the state's endpoint (the SDK's Batch API calls)."""
    return make_backend(BACKEND, state.model, state.base_url)


@batch_app.command("submit")
def submit(
    split: SplitOpt,
    coco_root: CocoRootOpt,
    coco_split: CocoSplitOpt = "val2017",
    out: Annotated[Optional[Path], typer.Option(help="Output JSONL the results go to (default data/<split>.jsonl).")] = None,
    limit: LimitOpt = None,
    image_ids: ImageIdsOpt = None,
    shard: ShardOpt = None,
    model: ModelOpt = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible endpoint with /files and /batches.")] = None,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.95,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    seed: SeedOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    prompts_dir: PromptsDirOpt = None,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    requests: Annotated[Optional[Path], typer.Option(
        help="Submit this request file as is (e.g. a resubmit file from collect).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write the request files but upload nothing.")] = False,
    absent_objects: AbsentObjectsOpt = DEFAULT_ABSENT_OBJECTS,
    cooccurrence_from: CooccurrenceFromOpt = None,
) -> None:
    """Write the request JSONL (custom_id = image id + split), upload it and create the batch."""
    config = build(
        BatchSubmitConfig,
        source=dict(split=split, coco_root=coco_root, coco_split=coco_split, limit=limit, image_ids=image_ids,
                    shard=shard, prompts_dir=prompts_dir, absent_objects=absent_objects,
                    cooccurrence_from=cooccurrence_from),
        model=dict(backend="openai", model=model, base_url=base_url),
        sampling=dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                      repetition_penalty=repetition_penalty),
        cache=dict(cache=cache, no_cache=no_cache),
        out=out, requests=requests, dry_run=dry_run,
    )
    run_submit(config)


def run_submit(config: BatchSubmitConfig) -> None:
    """Plan, write request files, upload and create batches; every step saved in the state file.

    Holds the output's lock throughout (cache hits are written to the output, the state file is rewritten).
    """
    with OutputLock(config.layout().samples):
        _run_submit(config)


def _run_submit(config: BatchSubmitConfig) -> None:
    split, layout = config.source.split.value, config.layout()
    prompts = load_prompt_set(config.source.prompts_dir, split)
    params, model_name = config.sampling.params(), config.model.model_name()
    cache_file = config.cache.cache_path(layout)
    sfile = layout.batch_state
    source = config.source
    cooccurrence = str(source.cooccurrence_from) if source.cooccurrence_from else None
    state = BatchState.load(sfile)
    if state is None:
        state = BatchState(split=split, model=model_name, base_url=config.model.base_url,
                           coco_root=str(config.source.coco_root), coco_split=config.source.coco_split,
                           prompts_dir=str(config.source.prompts_dir) if config.source.prompts_dir else None,
                           prompt_hash=prompts.hash, params=params.__dict__, cache=str(cache_file) if cache_file else None,
                           absent_objects=source.absent_objects, cooccurrence_from=cooccurrence)
    elif ((state.split, state.model, state.prompt_hash, state.params, state.absent_objects, state.cooccurrence_from)
          != (split, model_name, prompts.hash, params.__dict__, source.absent_objects, cooccurrence)):
        raise VisinstructError(f"{sfile} belongs to a batch run with other settings (split, model, prompts, sampling "
                               "or absent objects)",
                               "use the same settings, or another --out")
    if config.requests is not None:
        files = add_request_files(state, read_request_file(config.requests), layout.batch_dir)
    else:
        index = CocoIndex(config.source.coco_root, config.source.coco_split, with_instances=LlavaTask.needs_boxes(split))
        ids = select_ids(index, config.source.image_ids, config.source.limit, config.source.shard_spec)
        plan = plan_submit(task_of(state, index), layout, state, index.records(ids))
        if plan.from_cache:
            echo(f"{plan.from_cache} item(s) found in the cache and written to {layout.samples}")
        files = add_request_files(state, plan.lines, layout.batch_dir)
    layout.batch_dir.mkdir(parents=True, exist_ok=True)
    state.save(sfile)
    if not files and all(e.status != "written" and e.status != "uploaded" for e in state.batches):
        echo(f"nothing to submit: every image is done, cached or in a batch ({sfile})")
        return
    for path, count in files:
        echo(f"wrote {count} requests to {path}")
    if config.dry_run:
        echo("dry run: nothing uploaded; rerun without --dry-run to submit")
        return
    backend = _client(state)

    async def go():
        try:
            return await upload_and_create(backend.client, state, sfile)
        finally:
            await backend.aclose()

    for entry in asyncio.run(go()):
        echo(f"batch {entry.batch_id}: {entry.count} requests, {entry.status}")
    echo(f"state: {sfile}; check with `datagen batch status --out {layout.samples}`")


@batch_app.command("status")
def status(out: OutOpt) -> None:
    """Refresh and print the state of every batch of this output."""
    layout = OutputLayout(out)
    with OutputLock(layout.samples):  # the state file is rewritten
        _status(layout)


def _status(layout: OutputLayout) -> None:
    state = load_state(layout)
    backend = _client(state)

    async def go():
        try:
            await refresh(backend.client, state, layout.batch_state)
        finally:
            await backend.aclose()

    asyncio.run(go())
    for entry in state.batches:
        done = f", collected ({entry.succeeded} ok, {entry.failed} to resubmit)" if entry.collected else ""
        counts = " ".join(f"{k}={v}" for k, v in entry.counts.items())
        # Ids, statuses and counts come from the server's replies.
        echo(terminal_text(f"{entry.batch_id or '-'}  {entry.status:<11} {entry.count} requests {counts}{done}"))


@batch_app.command("collect")
def collect(out: OutOpt) -> None:
    """Download finished batches, write their samples like a live run would, and write resubmit files."""
    layout = OutputLayout(out)
    with OutputLock(layout.samples):
        _collect(layout, out)


def _collect(layout: OutputLayout, out: Path) -> None:
    state = load_state(layout)
    sfile, folder = layout.batch_state, layout.batch_dir
    prompts_of(state)  # the prompt files must still match before anything is downloaded
    backend = _client(state)
    table = load_prices()
    price = table.lookup(state.model)
    stats = RunStats(cost_usd=0.0 if price else None)

    async def fetch():
        try:
            await refresh(backend.client, state, sfile)
            ready = [e for e in state.batches if e.status in TERMINAL and not e.collected]
            results = []
            for entry in ready:
                outputs = await download_lines(backend.client, entry.output_file_id, state, folder / f"{entry.batch_id}.output.jsonl")
                errors = await download_lines(backend.client, entry.error_file_id, state, folder / f"{entry.batch_id}.errors.jsonl")
                results.append((entry, outputs, errors))
            return results
        finally:
            await backend.aclose()

    ready = asyncio.run(fetch())
    collected = collect_ready(layout, state, ready, stats, table.batch(price) if price else None,
                              lambda: state.save(sfile))
    for batch in collected:
        entry = batch.entry
        echo(terminal_text(f"batch {entry.batch_id} ({entry.status}): {batch.results} results, "
                           f"{entry.failed} to resubmit" + (f" -> {batch.resubmit}" if batch.resubmit else "")))
    waiting = [e for e in state.batches if not e.collected and e.batch_id]
    echo(f"{stats.accepted} accepted, {stats.rejected} rejected; tokens {stats.prompt_tokens} in / "
         f"{stats.completion_tokens} out; cost {format_usd(stats.cost_usd)} at Batch API prices")
    if waiting:
        echo(f"{len(waiting)} batch(es) still running; rerun `datagen batch collect --out {out}` later")
    resubmits = [e.resubmit_file for e in state.batches if e.resubmit_file]
    if any(batch.resubmit for batch in collected):
        echo(f"resubmit failed items with `datagen batch submit --split {state.split} --out {out} --requests FILE` "
             f"(files: {', '.join(resubmits)})")


def register(app: typer.Typer) -> None:
    app.add_typer(batch_app, name="batch")
