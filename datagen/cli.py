"""`datagen`: generate LLaVA-style visual instruction data from COCO."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from datagen.errors import VisinstructError
from datagen.splits import SPLITS

app = typer.Typer(
    help="Turn COCO captions and boxes into LLaVA-format visual instruction data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
coco_app = typer.Typer(help="Get COCO annotations and images.", no_args_is_help=True)
app.add_typer(coco_app, name="coco")


# The split names come from datagen.splits (one table for generation, parsing, prompts and checks).
Split = Enum("Split", {name: name for name in SPLITS}, type=str)


class BackendName(str, Enum):
    auto = "auto"
    local = "local"
    openai = "openai"


COOCCURRENCE_HELP = ("negative split: COCO instances file to count object co-occurrence over "
                     "(default: the split's own instances file).")
ABSENT_HELP = "negative split: absent objects listed per image."
COCO_ROOT_HELP = "COCO folder in the official layout (annotations/, <split>/ images); or set $COCO_ROOT."
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"


def _quiet_libraries() -> None:
    """Keep library chatter (loading bars, deprecation notes) off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers draws a tqdm bar while de-quantising GGUF weights; tqdm reads this at import time.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def parse_image_ids(text: Optional[str]) -> Optional[list[int]]:
    """'1,2, 3' -> [1, 2, 3]."""
    if not text:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise VisinstructError(f"--image-ids must be comma-separated integers, got {text!r}", "e.g. --image-ids 397133,37777") from None


def resolve_backend(backend: BackendName, base_url: Optional[str]) -> str:
    """`auto` means openai when an endpoint is configured, else the embedded local model."""
    if backend is not BackendName.auto:
        return backend.value
    return "openai" if (base_url or os.environ.get("OPENAI_BASE_URL")) else "local"


def make_backend(name: str, model: Optional[str], base_url: Optional[str], batch_size: int, concurrency: Optional[int],
                 timeout: float = 120.0, transport: str = "direct"):
    """Construct the named backend."""
    if name == "local":
        from datagen.backends.local import LocalBackend

        return LocalBackend(model=model, batch_size=batch_size)
    from datagen.backends.openai_backend import DEFAULT_CONCURRENCY, OpenAIBackend

    return OpenAIBackend(
        model=model or DEFAULT_OPENAI_MODEL,
        base_url=base_url or os.environ.get("OPENAI_BASE_URL"),
        concurrency=concurrency or DEFAULT_CONCURRENCY,
        timeout=timeout,
        transport=transport,
    )


@app.command()
def render(
    coco_root: Path = typer.Option(..., envvar="COCO_ROOT", help=COCO_ROOT_HELP),
    coco_split: str = typer.Option("val2017", help="Annotation split, e.g. val2017, train2017, train2014."),
    image_id: int = typer.Option(..., help="COCO image id."),
    split: Split = typer.Option("detail", help="Which split's context form (conversation omits boxes)."),
    seed: int = typer.Option(0, help="Seed (negative: breaks ties in the absent-object choice)."),
    cooccurrence_from: Optional[Path] = typer.Option(None, help=COOCCURRENCE_HELP),
    absent_objects: int = typer.Option(3, min=1, help=ABSENT_HELP),
) -> None:
    """Print the symbolic context the LLM sees for one image, and nothing else."""
    from datagen.coco import CocoIndex
    from datagen.context import context_builder
    from datagen.prompts import SPLITS_WITH_BOXES

    index = CocoIndex(coco_root, coco_split, with_instances=split.value in SPLITS_WITH_BOXES)
    builder = context_builder(split.value, index.instances, cooccurrence_from, seed, absent_objects)
    typer.echo(builder.render(index.record(image_id))[0])


ENGINE = "Engine: pacing, retries, cache"
COST = "Cost and sharding"


@app.command()
def generate(
    split: Split = typer.Option(..., help="Kind of sample to write."),
    coco_root: Path = typer.Option(..., envvar="COCO_ROOT", help=COCO_ROOT_HELP),
    coco_split: str = typer.Option("val2017", help="Annotation split, e.g. val2017."),
    out: Path = typer.Option(None, help="Output JSONL (appended; default data/<split>.jsonl, or data/<split>.shard-K-of-N.jsonl)."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most this many images."),
    image_ids: Optional[str] = typer.Option(None, help="Comma-separated COCO image ids (instead of all)."),
    backend: BackendName = typer.Option(BackendName.auto, help="auto = openai if an endpoint is configured, else local."),
    model: Optional[str] = typer.Option(None, help="Model name (openai) or local path / hub id / .gguf (local)."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint, e.g. http://gpu-box:8000/v1."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling mass."),
    max_tokens: int = typer.Option(512, min=1, help="Completion token limit per sample."),
    seed: int = typer.Option(0, help="Seed for sampling and instruction choice."),
    repetition_penalty: float = typer.Option(
        1.0, min=1.0, help="Penalise repeated tokens (1.0 = off; local backend, vLLM and llama.cpp servers)."
    ),
    batch_size: int = typer.Option(8, min=1, help="Local backend: prompts per forward pass."),
    prompts_dir: Optional[Path] = typer.Option(None, help="Prompt folder (default: prompts/ of this checkout)."),
    concurrency: Optional[int] = typer.Option(
        None, min=1, rich_help_panel=ENGINE, help="Requests in flight (default 64 for openai; 256+ suits vLLM; local: --batch-size)."),
    rpm: Optional[float] = typer.Option(None, min=1, rich_help_panel=ENGINE, help="Requests-per-minute budget (tightened by x-ratelimit headers)."),
    tpm: Optional[float] = typer.Option(None, min=1, rich_help_panel=ENGINE, help="Tokens-per-minute budget (prompt + max-tokens reserved)."),
    max_retries: int = typer.Option(6, min=0, rich_help_panel=ENGINE, help="Retries per item on 429/5xx/timeouts/resets; then it is recorded as failed."),
    timeout: float = typer.Option(120.0, min=0.1, rich_help_panel=ENGINE, help="Seconds per request before it counts as a timeout."),
    cache: Optional[Path] = typer.Option(None, rich_help_panel=ENGINE, help="Response cache file (default $VISINSTRUCT_CACHE or <out dir>/.cache/responses.sqlite)."),
    no_cache: bool = typer.Option(False, "--no-cache", rich_help_panel=ENGINE, help="Neither read nor write the response cache."),
    transport: str = typer.Option("direct", rich_help_panel=ENGINE,
                                  help="direct (aiohttp, fastest), or the openai SDK's request path over aiohttp or httpx."),
    shard: Optional[str] = typer.Option(None, rich_help_panel=COST, help="K/N: take the K-th of N stable slices of the images (join with `datagen merge`)."),
    budget: Optional[float] = typer.Option(None, min=0, rich_help_panel=COST, help="Stop starting requests before the run's spend could pass this many USD."),
    prices: Optional[Path] = typer.Option(None, rich_help_panel=COST, help="YAML/JSON price table merged over the shipped one."),
    dry_run: bool = typer.Option(False, "--dry-run", rich_help_panel=COST, help="Count prompt tokens and print the estimated cost; send nothing."),
    cooccurrence_from: Optional[Path] = typer.Option(None, help=COOCCURRENCE_HELP),
    absent_objects: int = typer.Option(3, min=1, help=ABSENT_HELP),
) -> None:
    """Generate samples of one split and append them to a JSONL file (resumable: rerun the same command)."""
    from datagen.backends.base import SamplingParams
    from datagen.cli_engine import print_dry_run, print_summary, progress_bar, select_ids
    from datagen.coco import CocoIndex
    from datagen.context import context_builder
    from datagen.engine.config import EngineConfig, default_cache_path
    from datagen.engine.shard import ShardSpec
    from datagen.pipeline import Job, done_ids, rejects_path, run_generation, sample_id, write_manifest
    from datagen.prompts import SPLITS_WITH_BOXES, load_prompt_set
    from datagen.quality import make_checker

    shard_spec = ShardSpec.parse(shard) if shard else None
    if out is None:
        suffix = f".shard-{shard_spec.index}-of-{shard_spec.count}" if shard_spec else ""
        out = Path("data") / f"{split.value}{suffix}.jsonl"
    prompts = load_prompt_set(prompts_dir, split.value)
    index = CocoIndex(coco_root, coco_split, with_instances=split.value in SPLITS_WITH_BOXES)
    ids = select_ids(index, parse_image_ids(image_ids), limit, shard_spec)
    context = context_builder(split.value, index.instances, cooccurrence_from, seed, absent_objects)
    backend_name = resolve_backend(backend, base_url)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                            repetition_penalty=repetition_penalty)
    engine_config = EngineConfig(
        rpm=rpm, tpm=tpm, max_retries=max_retries, budget_usd=budget, prices_path=prices,
        cache_path=None if no_cache else (cache or default_cache_path(out.parent)),
    )
    if dry_run:
        print_dry_run(split.value, prompts, params, index, ids, out, backend_name, model, engine_config, context)
        return
    done = done_ids(out, rejects_path(out))
    if all(sample_id(i) in done for i in ids):
        # A finished run's rerun: say so without loading a model or opening a connection.
        typer.echo(f"{split.value}: all {len(ids)} images already done in {out} (and its rejects file); nothing to generate")
        return
    engine = make_backend(backend_name, model, base_url, batch_size, concurrency, timeout, transport)
    job = Job(split.value, prompts, params, out, concurrency or engine.preferred_concurrency, engine=engine_config,
              checker=make_checker(split.value, seen=out), context=context)

    progress, on_progress = progress_bar(split.value, len(ids))

    async def run():
        try:
            return await run_generation(job, engine, index.records(ids), on_progress, done)
        finally:
            await engine.aclose()

    with progress:
        stats = asyncio.run(run())
    settings = {
        "split": split.value, "coco_root": str(coco_root), "coco_split": coco_split, "images": len(ids),
        "shard": str(shard_spec) if shard_spec else None,
        "backend": engine.name, "model": engine.model, "base_url": base_url, "prompt_hash": prompts.hash,
        "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed, "repetition_penalty": repetition_penalty,
        "concurrency": job.concurrency, "rpm": rpm, "tpm": tpm, "max_retries": max_retries, "budget_usd": budget,
        "cache": str(engine_config.cache_path) if engine_config.cache_path else None,
    }
    write_manifest(out, settings, stats)
    print_summary(split.value, out, stats, budget)


@app.command()
def captions(
    coco_root: Path = typer.Option(..., envvar="COCO_ROOT", help=COCO_ROOT_HELP),
    coco_split: str = typer.Option("val2017", help="Annotation split."),
    out: Path = typer.Option(Path("data/captions.jsonl"), help="Output JSONL of stage-1 pairs (overwritten)."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most this many images."),
    seed: int = typer.Option(0, help="Seed for caption and instruction choice."),
    all_captions: bool = typer.Option(False, help="One pair per caption instead of one per image."),
    prompts_dir: Optional[Path] = typer.Option(None, help="Prompt folder (default: prompts/ of this checkout)."),
) -> None:
    """Write stage-1 alignment pairs: a brief-description instruction + <image>, answered by a COCO caption."""
    from datagen.captions import write_caption_pairs

    count = write_caption_pairs(coco_root, coco_split, out, limit=limit, seed=seed, all_captions=all_captions,
                                prompts_dir=prompts_dir)
    typer.echo(f"{count} caption pairs -> {out}")


@coco_app.command("fetch")
def coco_fetch(
    split: str = typer.Option("val2017", help="Split to fetch: val2017, train2017, val2014, train2014."),
    images: int = typer.Option(50, min=0, help="Download the first N images of the split (by id)."),
    to: Path = typer.Option(Path("data/coco"), help="Destination COCO root."),
    base_url: str = typer.Option("http://images.cocodataset.org", help="Mirror of the official COCO site."),
    verify: bool = typer.Option(True, help="Check archive checksums where COCO's are known."),
) -> None:
    """Download COCO annotations and the first N images of a split (resumable)."""
    from datagen.fetch import fetch_coco

    root = fetch_coco(split=split, images=images, dest=to, base_url=base_url, verify=verify)
    typer.echo(f"COCO {split}: annotations and {images} images in {root}")


def _register_extensions() -> None:
    """Commands that live in their own modules (quality tools, engine tools) attach here."""
    import importlib

    for name in ("datagen.cli_quality", "datagen.cli_engine"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(app)


_register_extensions()


def main() -> None:
    """Entry point: turns project errors into one line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        app()  # click handles usage errors itself (one message, exit code 2)
    except VisinstructError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; rerun the same command to resume (finished samples are kept)", err=True)
        sys.exit(130)

if __name__ == "__main__":
    main()
