"""The one small interface every completion backend implements."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol


# Completion token limit when none is given: `datagen generate`, `batch submit` and `make data` (MAX_TOKENS) agree.
DEFAULT_MAX_TOKENS = 384
# How chat completions travel to an OpenAI-compatible endpoint (datagen.backends.openai_backend).
TRANSPORTS = ("direct", "aiohttp", "httpx")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings sent with each request (and part of the cache key)."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int = 0
    # 1.0 = off. Small local models loop without it; vLLM/llama.cpp servers accept it, OpenAI does not.
    repetition_penalty: float = 1.0
    # 0 = off: no n-gram of this size repeats within one completion (local backend only).
    no_repeat_ngram_size: int = 0
    # Completions per request (best-of-N): OpenAI's `n`, rows of one batch for the local model.
    n: int = 1

    def key_fields(self) -> dict:
        """The fields as cache keys see them: settings added later are left out at their default, so the keys of
        earlier runs (made before those settings existed) stay the same."""
        fields = asdict(self)
        for name, default in (("no_repeat_ngram_size", 0), ("n", 1)):
            if fields[name] == default:
                del fields[name]
        return fields


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to make; `key` identifies the work item (image id + split)."""

    key: str
    messages: list[dict[str, str]]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Completion:
    """What a backend returns for one request."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    # With n > 1: the other completions of the request (this one is the first). The prompt is counted once, on the
    # first; completion tokens on each choice where the backend reports them per choice, else all on the first.
    alternatives: tuple["Completion", ...] = ()

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def choices(self) -> tuple["Completion", ...]:
        """Every completion of the request, first one first."""
        return (self, *self.alternatives)

    @property
    def total_completion_tokens(self) -> int:
        """Completion tokens of every choice: what the request cost beyond its prompt."""
        if not self.alternatives:  # the usual single choice (read per completion, twice, by the recorder)
            return self.completion_tokens
        return self.completion_tokens + sum(c.completion_tokens for c in self.alternatives)


class Backend(Protocol):
    """Turns chat requests into completions; may batch or run many concurrently."""

    name: str
    model: str
    # How many requests the caller should keep in flight to use the backend well.
    preferred_concurrency: int
    # Set by the engine: called with each HTTP response's headers (x-ratelimit-*) so the limiter can
    # tighten; backends without rate-limit headers never call it.
    observe_headers: Callable[[Mapping[str, str]], None] | None

    async def complete(self, request: ChatRequest) -> Completion: ...

    async def aclose(self) -> None: ...
