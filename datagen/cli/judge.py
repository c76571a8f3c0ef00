"""`datagen judge`: score generated samples with an LLM judge and split them into accepted and rejected files."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.cli.common import make_backend
from datagen.cli.options import BackendOpt, BaseUrlOpt, CocoSplitOpt
from datagen.errors import VisinstructError
from datagen.escaping import echo
from datagen.judge import REASON_TOKENS, Scoring, run_judge
from datagen.run_config import BackendName, ModelOptions
from datagen.sample import default_cache_path


def judge(
    input: Annotated[Path, typer.Argument(help="LLaVA-format JSONL written by `datagen generate`.")],
    min_score: Annotated[float, typer.Option(min=1, max=10, help="Keep samples the judge scores at least this (1-10).")],
    model: Annotated[Optional[str], typer.Option(
        help="Judge model (openai) or local path / hub id / .gguf (local).")] = None,
    base_url: BaseUrlOpt = None,
    backend: BackendOpt = BackendName.auto,
    coco_root: Annotated[Optional[Path], typer.Option(
        envvar="COCO_ROOT", help="COCO root, for samples without a `context` field.")] = None,
    coco_split: CocoSplitOpt = "val2017",
    out_dir: Annotated[Optional[Path], typer.Option(
        help="Where <name>.judged.jsonl / <name>.judge-rejects.jsonl go (default: beside IN).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Response cache file (default: generation's, beside IN).")] = None,
    concurrency: Annotated[Optional[int], typer.Option(min=1, help="Judge calls in flight.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Local backend: prompts per forward pass.")] = 8,
    scoring: Annotated[Scoring, typer.Option(
        help="reply: parse the score the judge writes; logprobs: expected score from the digits' next-token "
             "probabilities after a prefilled 'Score: ' (local backend); auto: logprobs if the backend has them.")] = Scoring.auto,
    reason_tokens: Annotated[int, typer.Option(
        min=0, help="logprobs scoring: tokens for the judge's one-line reason after its score (0 = score only).")] = REASON_TOKENS,
) -> None:
    """Score each sample with an LLM judge against its image context; write accepted and rejected files (resumable)."""
    if backend is BackendName.vllm:
        raise VisinstructError("--backend vllm runs only on Ray workers during generation",
                               "judge with --backend openai (e.g. a vLLM server's --base-url) or local")
    name = ModelOptions(backend=backend, base_url=base_url).backend_name()
    engine = make_backend(name, model, base_url, batch_size, concurrency)
    echo(run_judge(input, engine, min_score, coco_root, coco_split, out_dir,
                         cache or default_cache_path(input.parent), concurrency,
                         scoring=scoring, reason_tokens=reason_tokens))


def register(app: typer.Typer) -> None:
    app.command("judge")(judge)
