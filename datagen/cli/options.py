"""Option groups shared by commands: one definition per flag, so `generate` and `batch submit` cannot drift.

Each group is a set of `Annotated` parameter types; a command lists them and passes the values to
`build`, which returns the one validated config object (datagen.run_config) the command runs from.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from datagen.errors import VisinstructError
from datagen.run_config import BackendName, Split, Transport
from datagen.sample import SPLIT_NAMES

COCO_ROOT_HELP = "COCO folder in the official layout (annotations/, <split>/ images); or set $COCO_ROOT."
ENGINE = "Engine: pacing, retries, cache"
COST = "Cost and sharding"
EXECUTOR = "Executor: this machine or a Ray cluster"

# One vocabulary: --split is always the kind of sample (a choice list), --coco-split always COCO's annotation split.
# Commands that read sample files also know stage-1 caption pairs (`datagen captions`).
SampleSplit = Enum("SampleSplit", {name: name for name in SPLIT_NAMES}, type=str)
SAMPLE_SPLIT_HELP = "Treat every sample as this split (default: the sample's split field, else the file name)."

# Source: which images.
SplitOpt = Annotated[Split, typer.Option(help="Kind of sample to write.")]
SampleSplitOpt = Annotated[Optional[SampleSplit], typer.Option("--split", help=SAMPLE_SPLIT_HELP)]
SplitsOpt = Annotated[list[Split], typer.Option(
    "--split", help="Kind of sample to write; repeat it for several (one model load and one run for all).")]
CocoRootOpt = Annotated[Path, typer.Option(envvar="COCO_ROOT", help=COCO_ROOT_HELP)]
CocoSplitOpt = Annotated[str, typer.Option(help="COCO annotation split, e.g. val2017, train2017, train2014.")]
LimitOpt = Annotated[Optional[int], typer.Option(min=1, help="At most this many images.")]
ImageIdsOpt = Annotated[Optional[str], typer.Option(help="Comma-separated COCO image ids (instead of all).")]
ShardOpt = Annotated[Optional[str], typer.Option(
    rich_help_panel=COST, help="K/N: take the K-th of N stable slices of the images (join with `datagen merge`).")]
PromptsDirOpt = Annotated[Optional[Path], typer.Option(help="Prompt folder (default: prompts/ of this checkout).")]
AbsentObjectsOpt = Annotated[int, typer.Option(min=1, help="negative split: absent objects listed per image.")]
CooccurrenceFromOpt = Annotated[Optional[Path], typer.Option(
    help="negative split: COCO instances file to count object co-occurrence over (default: the split's own).")]

# Model: who answers.
BackendOpt = Annotated[BackendName, typer.Option(help="auto = openai if an endpoint is configured, else local.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    help="Model name (openai; default gpt-4o-mini) or local path / hub id / .gguf (local).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option(help="OpenAI-compatible endpoint, e.g. http://gpu-box:8000/v1.")]

# Sampling.
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0 = greedy).")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")]
MaxTokensOpt = Annotated[int, typer.Option(min=1, help="Completion token limit per sample (`make data` uses the default).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling and instruction choice.")]
RepetitionPenaltyOpt = Annotated[float, typer.Option(
    min=1.0, help="Penalise repeated tokens (1.0 = off; local backend, vLLM and llama.cpp servers).")]
NoRepeatNgramOpt = Annotated[int, typer.Option(
    min=0, help="Local backend: no n-gram of this size repeats within an answer (0 = off).")]
CandidatesOpt = Annotated[int, typer.Option(
    min=1, max=16, help="Best-of-N: N completions per image in one call (OpenAI-compatible `n`, local batch rows); "
                        "the one that passes the checks is kept (ties: the longest); N and every candidate's "
                        "reject reasons go into meta.candidates. Local executor only.")]

# Engine.
TransportOpt = Annotated[Transport, typer.Option(
    rich_help_panel=ENGINE,
    help="How requests travel: direct (aiohttp, no SDK on the hot path: fastest), or the openai SDK over aiohttp or httpx.")]

# Cache.
CacheOpt = Annotated[Optional[Path], typer.Option(
    rich_help_panel=ENGINE, help="Response cache file (default $VISINSTRUCT_CACHE or <out dir>/.cache/responses.sqlite).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", rich_help_panel=ENGINE, help="Neither read nor write the response cache.")]

Config = TypeVar("Config", bound=BaseModel)


def build(config_type: type[Config], **values: object) -> Config:
    """The validated config; a value the flags' own checks let through but the model refuses is a user error."""
    try:
        return config_type.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "--" + "-".join(str(part) for part in first["loc"][-1:]).replace("_", "-")
        raise VisinstructError(f"{where}: {first['msg']}", "see --help for the accepted values") from None
