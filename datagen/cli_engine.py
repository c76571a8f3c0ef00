"""Engine commands (`cache`, `merge`, `batch`) and the helpers `generate` uses for ids, progress and cost."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import typer

from datagen.errors import VisinstructError

log = logging.getLogger(__name__)


def select_ids(index, image_ids: Optional[list[int]], limit: Optional[int], shard) -> list[int]:
    """The run's image ids: given or all, cut to --limit, then this shard's slice; unknown ids are user errors."""
    ids = image_ids or index.image_ids()
    if limit is not None:
        ids = ids[:limit]
    for image_id in ids:  # fail before loading a model if an id is wrong
        if image_id not in index.captions.imgs:
            index.record(image_id)
    if shard is not None:
        ids = [i for i in ids if shard.contains(i)]
    return ids


def format_usd(value: Optional[float]) -> str:
    return "n/a" if value is None else (f"${value:.4f}" if value < 1 else f"${value:,.2f}")


def progress_bar(split: str, total: int):
    """A rich progress bar (done/total, rate, ETA, tokens, cost, failures) and the callback that feeds it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn(f"[bold]{split}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("tok {task.fields[tok]} cost {task.fields[cost]} ok {task.fields[ok]} rej {task.fields[rej]} "
                   "fail {task.fields[fail]} cached {task.fields[cached]}"),
        transient=False,
    )
    task = progress.add_task(split, total=total, ok=0, rej=0, fail=0, tok=0, cost="$0", rate="0.0", cached=0)
    started = time.monotonic()

    def on_progress(stats) -> None:
        worked = stats.processed - stats.skipped
        rate = worked / max(time.monotonic() - started, 1e-6)
        progress.update(task, completed=stats.processed, ok=stats.accepted, rej=stats.rejected, fail=stats.failed,
                        tok=stats.prompt_tokens + stats.completion_tokens, cost=format_usd(stats.cost_usd),
                        rate=f"{rate:.1f}", cached=stats.cache_hits)

    return progress, on_progress


def print_summary(split: str, out: Path, stats, budget: Optional[float]) -> None:
    """The end-of-run report: counts, tokens, cost, and where the files are."""
    from datagen.pipeline import failures_path, rejects_path

    total = stats.accepted + stats.rejected
    share = f" ({100 * stats.accepted / total:.0f}% accepted)" if total else ""
    typer.echo(
        f"{split}: {stats.accepted} accepted, {stats.rejected} rejected, {stats.failed} failed, "
        f"{stats.skipped} already done{share}; tokens {stats.prompt_tokens} in / {stats.completion_tokens} out; "
        f"cost {format_usd(stats.cost_usd)}; {stats.requests} requests ({stats.retries} retries), "
        f"{stats.cache_hits} from cache; {stats.elapsed_s:.1f}s"
    )
    if stats.reject_reasons:
        typer.echo("  reject reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.reject_reasons.items())))
    for failure in stats.failures[:5]:
        typer.echo(f"  failed: {failure}", err=True)
    if stats.failed:
        typer.echo(f"  {stats.failed} failed item(s) listed in {failures_path(out)}; rerun the same command to retry only them",
                   err=True)
    if stats.budget_stopped:
        typer.echo(f"  budget {format_usd(budget)} reached: {stats.budget_stopped} item(s) not started; "
                   "rerun with a higher --budget to finish", err=True)
    typer.echo(f"  samples: {out}\n  rejects: {rejects_path(out)}")


def print_dry_run(split, prompts, params, index, ids, out, backend_name, model, config, context=None) -> None:
    """Count the prompt tokens of every pending request and price the run; sends nothing."""
    from datagen.cli import DEFAULT_OPENAI_MODEL
    from datagen.engine.cache import ResponseCache, cache_key
    from datagen.engine.cost import load_prices
    from datagen.engine.tokens import PromptTokenCounter
    from datagen.pipeline import Job, build_request, done_ids, rejects_path, sample_id

    model_name = model or (DEFAULT_OPENAI_MODEL if backend_name == "openai" else "smollm2-135m-instruct")
    job = Job(split, prompts, params, out, 1, engine=config, context=context)
    done = done_ids(out, rejects_path(out))
    cache = ResponseCache(config.cache_path) if config.cache_path and Path(config.cache_path).exists() else None
    counter = PromptTokenCounter()
    pending = cached = already = prompt_tokens = 0
    for record in index.records(ids):
        if sample_id(record.id) in done:
            already += 1
            continue
        request, _ = build_request(job, record)
        if cache is not None and cache.get(cache_key(backend_name, model_name, request)) is not None:
            cached += 1
            continue
        pending += 1
        prompt_tokens += counter.count(request.messages)
    if cache is not None:
        cache.close()
    table = load_prices(config.prices_path)
    price = table.lookup(model_name) if backend_name != "local" else None
    worst_out = pending * params.max_tokens
    typer.echo(f"dry run, {split} with {backend_name}:{model_name}: {len(ids)} images, {already} already done, "
               f"{cached} in the cache, {pending} to request")
    typer.echo(f"  prompt tokens: {prompt_tokens:,} (cl100k_base count; {prompt_tokens / max(pending, 1):,.0f} per request)")
    typer.echo(f"  completion tokens: at most {worst_out:,} ({params.max_tokens} per request)")
    if backend_name == "local":
        typer.echo("  cost: $0 (local model)")
    elif price is None:
        typer.echo(f"  cost: unknown, no price for {model_name!r}; pass --prices FILE")
    else:
        low, high = price.cost(prompt_tokens, 0), price.cost(prompt_tokens, worst_out)
        batch = table.batch(price)
        typer.echo(f"  estimated cost: {format_usd(low)} for the prompts + up to {format_usd(high - low)} for completions "
                   f"= at most {format_usd(high)} (Batch API: at most {format_usd(batch.cost(prompt_tokens, worst_out))})")
        if config.budget_usd is not None and high > config.budget_usd:
            typer.echo(f"  note: --budget {format_usd(config.budget_usd)} may stop the run before it finishes")


def register(app: typer.Typer) -> None:
    """Attach `cache`, `merge` and `batch` to the datagen app."""
    cache_app = typer.Typer(help="Inspect or empty the response cache.", no_args_is_help=True)
    batch_app = typer.Typer(help="Generate through OpenAI's Batch API (half price, results within 24 h).", no_args_is_help=True)
    app.add_typer(cache_app, name="cache")
    app.add_typer(batch_app, name="batch")

    def resolve_cache(path: Optional[Path]) -> Path:
        from datagen.engine.config import default_cache_path

        return path or default_cache_path()

    @cache_app.command("stats")
    def cache_stats(cache: Optional[Path] = typer.Option(None, help="Cache file (default $VISINSTRUCT_CACHE or data/.cache/responses.sqlite).")) -> None:
        """Entries, size and stored tokens of the response cache."""
        from datagen.engine.cache import ResponseCache

        path = resolve_cache(cache)
        if not path.exists():
            raise VisinstructError(f"no cache at {path}", "run `datagen generate` first or pass --cache FILE")
        store = ResponseCache(path)
        stats = store.stats()
        store.close()
        typer.echo(f"{stats.path}: {stats.entries} responses, {stats.size_bytes / 1e6:.1f} MB, "
                   f"tokens {stats.prompt_tokens} in / {stats.completion_tokens} out")
        for name, count in sorted(stats.by_model.items()):
            typer.echo(f"  {name}: {count}")

    @cache_app.command("clear")
    def cache_clear(
        cache: Optional[Path] = typer.Option(None, help="Cache file (default $VISINSTRUCT_CACHE or data/.cache/responses.sqlite)."),
        model: Optional[str] = typer.Option(None, help="Only this model's responses."),
    ) -> None:
        """Delete cached responses (the next run pays for them again)."""
        from datagen.engine.cache import ResponseCache

        path = resolve_cache(cache)
        if not path.exists():
            raise VisinstructError(f"no cache at {path}", "nothing to clear; pass --cache FILE if it lives elsewhere")
        store = ResponseCache(path)
        removed = store.clear(model)
        store.close()
        typer.echo(f"removed {removed} responses from {path}")

    @app.command("merge")
    def merge(
        inputs: list[Path] = typer.Argument(..., help="Shard outputs, e.g. data/detail.shard-*-of-4.jsonl."),
        out: Path = typer.Option(..., help="Merged JSONL (rejects go beside it)."),
        allow_missing: bool = typer.Option(False, help="Write the merge even if some shard or image is not done."),
    ) -> None:
        """Join shard outputs, checking that no id is doubled and no shard or image is missing."""
        from datagen.engine.shard import merge_shards

        report = merge_shards(list(inputs), out, allow_missing=allow_missing)
        typer.echo(f"merged {len(inputs)} file(s), shards {', '.join(report.shards) or 'n/a'}: "
                   f"{report.samples} samples -> {out}, {report.rejects} rejects")
        for line in report.missing:
            typer.echo(f"  missing: {line}", err=True)

    from datagen.engine import batch_cli

    batch_cli.register(batch_app)
