"""The engine's settings in one typed place; the CLI flags override the defaults here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    """How a run talks to its backend: pacing, retries, cache and spending limits."""

    rpm: float | None = None  # requests per minute; None = unlimited until the server's headers say otherwise
    tpm: float | None = None  # tokens per minute (prompt + max completion tokens reserved per request)
    max_retries: int = 6  # retries after the first attempt, for transient failures only
    backoff_base_s: float = 0.5  # first backoff step; doubles per retry, with full jitter
    backoff_max_s: float = 60.0
    cache_path: Path | None = None  # None = no response cache (the library default; the CLI turns it on)
    budget_usd: float | None = None  # stop starting requests that could push the run's spend past this
    prices_path: Path | None = None  # extra price table merged over the shipped one
