"""A generation run's settings as one validated object: built from the CLI's option groups, dumped as the manifest."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from datagen.backends.base import DEFAULT_MAX_TOKENS, TRANSPORTS, SamplingParams
from datagen.context import DEFAULT_ABSENT_OBJECTS
from datagen.engine.config import EngineConfig
from datagen.engine.shard import ShardSpec
from datagen.errors import VisinstructError
from datagen.sample import OutputLayout
from datagen.splits import SPLITS
from datagen.urls import check_base_url

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
DEFAULT_LOCAL_MODEL = "smollm2-135m-instruct"


# The split names come from datagen.splits (one table for generation, parsing, prompts and checks).
Split = Enum("Split", {name: name for name in SPLITS}, type=str)
Transport = Enum("Transport", {name: name for name in TRANSPORTS}, type=str)


class BackendName(str, Enum):
    auto = "auto"
    local = "local"
    openai = "openai"
    vllm = "vllm"  # vLLM engines on Ray GPU workers (ray.data.llm): --executor ray only


class ExecutorName(str, Enum):
    local = "local"  # the live engine on this machine
    ray = "ray"  # Ray Data over a cluster (or a local Ray)


class ExecutorOptions(BaseModel):
    """Who runs the engine: this machine, or a Ray cluster."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    executor: ExecutorName = ExecutorName.local
    ray_address: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ExecutorOptions":
        if self.ray_address and self.executor is not ExecutorName.ray:
            raise VisinstructError("--ray-address needs --executor ray", "add --executor ray or drop --ray-address")
        return self


class SourceOptions(BaseModel):
    """Which images: the COCO split, and which of its images (ids, limit, shard)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    split: Split
    coco_root: Path
    coco_split: str = "val2017"
    limit: int | None = Field(None, ge=1)
    image_ids: list[int] | None = None
    shard: str | None = None
    prompts_dir: Path | None = None
    # Negative split: how many absent objects per image, and the instances file co-occurrence is counted over
    # (None: the split's own).
    absent_objects: int = Field(DEFAULT_ABSENT_OBJECTS, ge=1)
    cooccurrence_from: Path | None = None

    @field_validator("image_ids", mode="before")
    @classmethod
    def _ids(cls, value: object) -> object:
        """'1,2, 3' -> [1, 2, 3]."""
        if not isinstance(value, str):
            return value or None
        try:
            return [int(part) for part in value.replace(" ", "").split(",") if part] or None
        except ValueError:
            raise VisinstructError(f"--image-ids must be comma-separated integers, got {value!r}",
                                   "e.g. --image-ids 397133,37777") from None

    @field_validator("shard")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        return str(ShardSpec.parse(value)) if value else None

    @property
    def shard_spec(self) -> ShardSpec | None:
        return ShardSpec.parse(self.shard) if self.shard else None


class ModelOptions(BaseModel):
    """Who answers: the backend, its model and endpoint."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backend: BackendName = BackendName.auto
    model: str | None = None
    base_url: str | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        """Refused up front: a malformed endpoint would otherwise fail only after retries."""
        return check_base_url(value)

    def backend_name(self) -> str:
        """`auto` means openai when an endpoint is configured, else the embedded local model."""
        if self.backend is not BackendName.auto:
            return self.backend.value
        return "openai" if (self.base_url or os.environ.get("OPENAI_BASE_URL")) else "local"

    def model_name(self) -> str:
        """The model named by --model, else the backend's default."""
        return self.model or (DEFAULT_OPENAI_MODEL if self.backend_name() == "openai" else DEFAULT_LOCAL_MODEL)


class SamplingOptions(BaseModel):
    """Sampling settings, sent with every request (and part of the cache key)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    seed: int = 0
    repetition_penalty: float = Field(1.0, ge=1.0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    candidates: int = Field(1, ge=1, le=16)

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=self.seed, repetition_penalty=self.repetition_penalty,
                              no_repeat_ngram_size=self.no_repeat_ngram_size, n=self.candidates)


class CacheOptions(BaseModel):
    """The response cache: where, or none."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cache: Path | None = None
    no_cache: bool = False

    def cache_path(self, layout: OutputLayout) -> Path | None:
        return None if self.no_cache else (self.cache or layout.default_cache)


class LiveOptions(BaseModel):
    """How the live engine paces, retries and spends."""

    # The transport is checked against its choices, then kept as its plain name (what the backends compare).
    model_config = ConfigDict(extra="forbid", use_enum_values=True, allow_inf_nan=False)

    batch_size: int = Field(8, ge=1)
    concurrency: int | None = Field(None, ge=1)
    rpm: float | None = Field(None, ge=1)
    tpm: float | None = Field(None, ge=1)
    max_retries: int = Field(6, ge=0)
    timeout: float = Field(120.0, ge=0.1)
    transport: Transport = Transport.direct
    budget: float | None = Field(None, ge=0)
    prices: Path | None = None


class GenerateConfig(BaseModel):
    """Everything `datagen generate` was asked to do; the run manifest is this, dumped."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: SourceOptions
    model: ModelOptions = ModelOptions()
    sampling: SamplingOptions = SamplingOptions()
    cache: CacheOptions = CacheOptions()
    live: LiveOptions = LiveOptions()
    executor: ExecutorOptions = ExecutorOptions()
    out: Path | None = None
    out_dir: Path = Path("data")
    dry_run: bool = False

    @model_validator(mode="after")
    def _local_only_settings(self) -> "GenerateConfig":
        if self.sampling.candidates > 1 and self.executor.executor is ExecutorName.ray:
            raise VisinstructError("--candidates runs on the local executor only",
                                   "drop --executor ray, or drop --candidates (best-of-N is not built for Ray)")
        if self.sampling.no_repeat_ngram_size and self.model.backend_name() != "local":
            raise VisinstructError("--no-repeat-ngram-size works with the local backend only",
                                   "drop it, or use --repetition-penalty (vLLM and llama.cpp servers accept it)")
        return self

    @model_validator(mode="after")
    def _vllm_on_ray(self) -> "GenerateConfig":
        if self.model.backend is BackendName.vllm and self.executor.executor is not ExecutorName.ray:
            raise VisinstructError("--backend vllm runs only on Ray", "add --executor ray (and pip install -e '.[vllm]')")
        return self

    def layout(self) -> OutputLayout:
        """--out, else <out-dir>/<split>.jsonl (<out-dir>/<split>.shard-K-of-N.jsonl for a shard)."""
        if self.out:
            return OutputLayout(self.out)
        return OutputLayout.default(self.source.split.value, self.source.shard, self.out_dir)

    def for_split(self, split: str) -> "GenerateConfig":
        """The same run for another split (one config, and one manifest entry, per split of a multi-split run)."""
        return self.model_copy(update={"source": self.source.model_copy(update={"split": Split(split)})})

    def engine_config(self) -> EngineConfig:
        live = self.live
        return EngineConfig(rpm=live.rpm, tpm=live.tpm, max_retries=live.max_retries, budget_usd=live.budget,
                            prices_path=live.prices, cache_path=self.cache.cache_path(self.layout()))


class BatchSubmitConfig(BaseModel):
    """Everything `datagen batch submit` was asked to do: the same source, model, sampling and cache groups."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: SourceOptions
    model: ModelOptions = ModelOptions(backend=BackendName.openai)
    sampling: SamplingOptions = SamplingOptions()
    cache: CacheOptions = CacheOptions()
    out: Path | None = None
    requests: Path | None = None
    dry_run: bool = False

    def layout(self) -> OutputLayout:
        return OutputLayout(self.out) if self.out else OutputLayout.default(self.source.split.value, self.source.shard)
