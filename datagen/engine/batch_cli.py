"""`datagen batch submit | status | collect`: the Batch API flow, rerunnable at every step."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Optional

import typer

from datagen.errors import VisinstructError


def _client(state):
    from datagen.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(model=state.model, base_url=state.base_url or os.environ.get("OPENAI_BASE_URL"))


def _job(state, out: Path, context=None):
    """The Job that live runs of the same settings would use (same prompts, params, cache, context)."""
    from datagen.engine.batch_api import batch_dir
    from datagen.engine.config import EngineConfig
    from datagen.pipeline import Job
    from datagen.prompts import load_prompt_set

    prompts = load_prompt_set(Path(state.prompts_dir) if state.prompts_dir else None, state.split)
    if prompts.hash != state.prompt_hash:
        raise VisinstructError(f"the {state.split} prompt files changed since this batch was submitted",
                               "restore them, or submit again to a new --out")
    from datagen.quality import make_checker

    # The same gate as live runs, comparing with samples accepted earlier in this output.
    checker = make_checker(state.split, seen=out)
    config = EngineConfig(cache_path=Path(state.cache) if state.cache else None,
                          failures_path=batch_dir(out) / "failures.jsonl")
    return Job(state.split, prompts, state.sampling, out, 1, checker=checker, engine=config, context=context)


def _load_state(out: Path):
    from datagen.engine.batch_api import BatchState, state_path

    state = BatchState.load(state_path(out))
    if state is None:
        raise VisinstructError(f"no batch state beside {out} ({state_path(out)})", "run `datagen batch submit` first")
    return state


def register(batch_app: typer.Typer) -> None:
    """Attach submit, status and collect."""

    @batch_app.command("submit")
    def submit(
        split: str = typer.Option(..., help="conversation, detail or reasoning."),
        coco_root: Path = typer.Option(..., envvar="COCO_ROOT", help="COCO folder in the official layout (or $COCO_ROOT)."),
        coco_split: str = typer.Option("val2017", help="Annotation split."),
        out: Optional[Path] = typer.Option(None, help="Output JSONL the results go to (default data/<split>.jsonl)."),
        limit: Optional[int] = typer.Option(None, min=1, help="At most this many images."),
        image_ids: Optional[str] = typer.Option(None, help="Comma-separated COCO image ids."),
        shard: Optional[str] = typer.Option(None, help="K/N slice of the images."),
        model: str = typer.Option("gpt-4o-mini", help="Model name."),
        base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint with /files and /batches."),
        temperature: float = typer.Option(0.7, min=0.0),
        top_p: float = typer.Option(0.95, min=0.0, max=1.0),
        max_tokens: int = typer.Option(512, min=1),
        seed: int = typer.Option(0),
        prompts_dir: Optional[Path] = typer.Option(None, help="Prompt folder."),
        cache: Optional[Path] = typer.Option(None, help="Response cache (default as for generate)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Do not consult or fill the cache."),
        requests: Optional[Path] = typer.Option(None, help="Submit this request file as is (e.g. a resubmit file from collect)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Write the request files but upload nothing."),
    ) -> None:
        """Write the request JSONL (custom_id = image id + split), upload it and create the batch."""
        from datagen.backends.base import SamplingParams
        from datagen.cli import parse_image_ids
        from datagen.cli_engine import select_ids
        from datagen.coco import CocoIndex
        from datagen.engine.batch_api import (BatchEntry, BatchState, batch_dir, custom_id, ids_in_request_file,
                                              request_line, state_path, upload_and_create, write_request_files)
        from datagen.engine.cache import ResponseCache, cache_key
        from datagen.engine.config import default_cache_path
        from datagen.engine.shard import ShardSpec
        from datagen.pipeline import Outcome, ResultSink, RunStats, WorkItem, build_request, done_ids, rejects_path, sample_id
        from datagen.prompts import SPLITS, SPLITS_WITH_BOXES, load_prompt_set

        if split not in SPLITS:
            raise VisinstructError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
        shard_spec = ShardSpec.parse(shard) if shard else None
        out = out or Path("data") / f"{split}.jsonl"
        prompts = load_prompt_set(prompts_dir, split)
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        cache_file = None if no_cache else (cache or default_cache_path(out.parent))
        sfile = state_path(out)
        state = BatchState.load(sfile)
        fresh_state = BatchState(split=split, model=model, base_url=base_url, coco_root=str(coco_root), coco_split=coco_split,
                                 prompts_dir=str(prompts_dir) if prompts_dir else None, prompt_hash=prompts.hash,
                                 params=params.__dict__, cache=str(cache_file) if cache_file else None)
        if state is None:
            state = fresh_state
        elif (state.split, state.model, state.prompt_hash, state.params) != (split, model, prompts.hash, params.__dict__):
            raise VisinstructError(f"{sfile} belongs to a batch run with other settings (split, model, prompts or sampling)",
                                   "use the same settings, or another --out")
        folder = batch_dir(out)
        number = len(state.batches) + 1
        if requests is not None:
            if not requests.exists():
                raise VisinstructError(f"request file not found: {requests}", "check the --requests path")
            lines = [json.loads(line) for line in requests.read_text(encoding="utf-8").splitlines() if line.strip()]
            files = write_request_files(lines, folder, number)
        else:
            index = CocoIndex(coco_root, coco_split, with_instances=split in SPLITS_WITH_BOXES)
            ids = select_ids(index, parse_image_ids(image_ids), limit, shard_spec)
            done = done_ids(out, rejects_path(out))
            in_flight: set[str] = set()
            for entry in state.batches:
                if not entry.collected:
                    in_flight |= ids_in_request_file(Path(entry.request_file))
            from datagen.context import context_builder

            # The negative split's absent objects need the split's co-occurrence counts.
            context = context_builder(split, index.instances, seed=seed)
            job = _job(state, out, context) if state.batches else None
            from datagen.engine.config import EngineConfig
            from datagen.pipeline import Job

            job = job or Job(split, prompts, params, out, 1, engine=EngineConfig(cache_path=cache_file,
                                                                                 failures_path=folder / "failures.jsonl"),
                             context=context)
            store = ResponseCache(cache_file) if cache_file else None
            from_cache: list[Outcome] = []
            lines = []
            for record in index.records(ids):
                sid = sample_id(record.id)
                if sid in done or sid in in_flight:
                    continue
                request, context = build_request(job, record)
                key = cache_key("openai", model, request)
                hit = store.get(key) if store is not None else None
                if hit is not None:
                    from_cache.append(Outcome(WorkItem(record, request, context, key), hit))
                else:
                    lines.append(request_line(custom_id(sid, split), model, request.messages, params))
            if store is not None:
                store.close()
            if from_cache:  # already paid for: write them now, exactly as a live run would
                from datagen.engine.batch_api import sink_backend

                sink = ResultSink(job, sink_backend(state), RunStats(), None, None)
                sink.open()
                try:
                    sink.handle_batch(from_cache)
                finally:
                    sink.close()
                typer.echo(f"{len(from_cache)} item(s) found in the cache and written to {out}")
            files = write_request_files(lines, folder, number)
        for path, count in files:
            state.batches.append(BatchEntry(request_file=str(path), count=count))
        folder.mkdir(parents=True, exist_ok=True)
        state.save(sfile)
        if not files and all(e.status != "written" and e.status != "uploaded" for e in state.batches):
            typer.echo(f"nothing to submit: every image is done, cached or in a batch ({sfile})")
            return
        for path, count in files:
            typer.echo(f"wrote {count} requests to {path}")
        if dry_run:
            typer.echo("dry run: nothing uploaded; rerun without --dry-run to submit")
            return
        backend = _client(state)

        async def go():
            try:
                return await upload_and_create(backend.client, state, sfile)
            finally:
                await backend.aclose()

        for entry in asyncio.run(go()):
            typer.echo(f"batch {entry.batch_id}: {entry.count} requests, {entry.status}")
        typer.echo(f"state: {sfile}; check with `datagen batch status --out {out}`")

    @batch_app.command("status")
    def status(out: Path = typer.Option(..., help="The output JSONL given to submit.")) -> None:
        """Refresh and print the state of every batch of this output."""
        from datagen.engine.batch_api import refresh, state_path

        state = _load_state(out)
        backend = _client(state)

        async def go():
            try:
                await refresh(backend.client, state, state_path(out))
            finally:
                await backend.aclose()

        asyncio.run(go())
        for entry in state.batches:
            done = f", collected ({entry.succeeded} ok, {entry.failed} to resubmit)" if entry.collected else ""
            counts = " ".join(f"{k}={v}" for k, v in entry.counts.items())
            typer.echo(f"{entry.batch_id or '-'}  {entry.status:<11} {entry.count} requests {counts}{done}")

    @batch_app.command("collect")
    def collect(out: Path = typer.Option(..., help="The output JSONL given to submit.")) -> None:
        """Download finished batches, write their samples like a live run would, and write resubmit files."""
        from datagen.cli_engine import format_usd
        from datagen.coco import CocoIndex
        from datagen.engine.batch_api import (TERMINAL, batch_dir, download_lines, refresh, sink_backend, split_results,
                                              state_path, write_resubmit)
        from datagen.engine.cache import cache_key
        from datagen.engine.cost import load_prices
        from datagen.pipeline import Outcome, ResultSink, RunStats, WorkItem, build_request, done_ids, rejects_path
        from datagen.prompts import SPLITS_WITH_BOXES

        from datagen.context import context_builder

        state = _load_state(out)
        sfile, folder = state_path(out), batch_dir(out)
        backend = _client(state)
        table = load_prices()
        price = table.lookup(state.model)
        stats = RunStats(cost_usd=0.0 if price else None)
        index = CocoIndex(state.coco_root, state.coco_split, with_instances=state.split in SPLITS_WITH_BOXES)
        job = _job(state, out, context_builder(state.split, index.instances, seed=state.sampling.seed))
        sink = ResultSink(job, sink_backend(state), stats, table.batch(price) if price else None, None)

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
        done = done_ids(out, rejects_path(out))
        sink.open()
        try:
            for entry, outputs, errors in ready:
                completions, failed = split_results(entry, outputs, errors, state.model)
                outcomes = []
                for cid, completion in completions.items():
                    sid = cid.split(":", 1)[0]
                    if sid in done:  # collected before (a rerun after a crash mid-collect)
                        continue
                    record = index.record(int(sid))
                    request, context = build_request(job, record)
                    outcomes.append(Outcome(WorkItem(record, request, context, cache_key("openai", state.model, request)),
                                            completion, fresh=True))
                    done.add(sid)
                sink.handle_batch(outcomes)
                resubmit = write_resubmit(entry, failed, folder)
                entry.collected, entry.succeeded, entry.failed = True, len(completions), len(failed)
                entry.resubmit_file = str(resubmit) if resubmit else None
                state.save(sfile)
                typer.echo(f"batch {entry.batch_id} ({entry.status}): {len(completions)} results, {len(failed)} to resubmit"
                           + (f" -> {resubmit}" if resubmit else ""))
        finally:
            sink.close()
        waiting = [e for e in state.batches if not e.collected and e.batch_id]
        typer.echo(f"{stats.accepted} accepted, {stats.rejected} rejected; tokens {stats.prompt_tokens} in / "
                   f"{stats.completion_tokens} out; cost {format_usd(stats.cost_usd)} at Batch API prices")
        if waiting:
            typer.echo(f"{len(waiting)} batch(es) still running; rerun `datagen batch collect --out {out}` later")
        resubmits = [e.resubmit_file for e in state.batches if e.resubmit_file]
        if ready and any(e.resubmit_file for e, _, _ in ready):
            typer.echo(f"resubmit failed items with `datagen batch submit --split {state.split} --out {out} --requests FILE` "
                       f"(files: {', '.join(resubmits)})")
