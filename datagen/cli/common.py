"""What several commands share: picking image ids, making a backend, and the end-of-run summary."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from datagen.backends.base import Backend
from datagen.cli.progress import format_usd
from datagen.coco import CocoIndex
from datagen.engine.shard import ShardSpec
from datagen.engine.work import RunStats
from datagen.escaping import echo, terminal_text
from datagen.run_config import DEFAULT_OPENAI_MODEL
from datagen.sample import OutputLayout, sample_inputs


def select_ids(index: CocoIndex, image_ids: Optional[list[int]], limit: Optional[int], shard: Optional[ShardSpec]) -> list[int]:
    """The run's image ids, ascending: given or all, cut to --limit, then this shard's slice; unknown ids are user errors.

    Ascending order is the run's order, which near-duplicate decisions follow (see datagen.sink).
    """
    ids = sorted(dict.fromkeys(image_ids)) if image_ids else index.image_ids()
    if limit is not None:
        ids = ids[:limit]
    for image_id in ids:  # fail before loading a model if an id is wrong
        if image_id not in index.captions.imgs:
            index.record(image_id)
    if shard is not None:
        ids = [i for i in ids if shard.contains(i)]
    return ids


def sample_files(paths: list[Path], with_rejects: bool = False, rejects_readable: bool = True) -> list[Path]:
    """The inputs a command reads: the files datagen writes beside its outputs (manifests, failures, Batch API
    state, rejects unless asked) are skipped, and one note on stderr says which (datagen.sample.sample_inputs)."""
    inputs = sample_inputs(paths, with_rejects, rejects_readable)
    note = inputs.note("--with-rejects" if rejects_readable else None)
    if note:
        echo(terminal_text(note), err=True)
    return inputs.read


def make_backend(name: str, model: Optional[str], base_url: Optional[str], batch_size: int = 8,
                 concurrency: Optional[int] = None, timeout: float = 120.0, transport: str = "direct") -> Backend:
    """Construct the named backend."""
    if name == "local":
        from datagen.backends.local import LocalBackend  # imports torch and transformers: seconds, only when used

        return LocalBackend(model=model, batch_size=batch_size)
    from datagen.backends.openai_backend import DEFAULT_CONCURRENCY, OpenAIBackend  # the openai SDK is slow to import

    return OpenAIBackend(
        model=model or DEFAULT_OPENAI_MODEL,
        base_url=base_url or os.environ.get("OPENAI_BASE_URL"),
        concurrency=concurrency or DEFAULT_CONCURRENCY,
        timeout=timeout,
        transport=transport,
    )


def print_summary(split: str, layout: OutputLayout, stats: RunStats, budget: Optional[float]) -> None:
    """The end-of-run report: counts, tokens, cost, and where the files are."""
    total = stats.accepted + stats.rejected
    share = f" ({100 * stats.accepted / total:.0f}% accepted)" if total else ""
    echo(
        f"{split}: {stats.accepted} accepted, {stats.rejected} rejected, {stats.failed} failed, "
        f"{stats.skipped} already done{share}; tokens {stats.prompt_tokens} in / {stats.completion_tokens} out; "
        f"cost {format_usd(stats.cost_usd)}; {stats.requests} requests ({stats.retries} retries), "
        f"{stats.cache_hits} from cache; {stats.elapsed_s:.1f}s"
    )
    if stats.reject_reasons:
        echo("  reject reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.reject_reasons.items())))
    for failure in stats.failures[:5]:
        echo(f"  failed: {terminal_text(failure)}", err=True)  # may quote a server's reply
    if stats.failed:
        echo(f"  {stats.failed} failed item(s) listed in {layout.failures}; rerun the same command to retry only them",
             err=True)
    if stats.budget_stopped:
        echo(f"  budget {format_usd(budget)} reached: {stats.budget_stopped} item(s) not started; "
             "rerun with a higher --budget to finish", err=True)
    echo(f"  samples: {layout.samples}\n  rejects: {layout.rejects}")
