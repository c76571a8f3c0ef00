"""The generation engine: concurrency, rate limits, retries, cache, resume, shards, cost, Batch API."""
from datagen.engine.config import EngineConfig
from datagen.engine.errors import MalformedResponseError, RateLimitedError, TransientError

__all__ = ["EngineConfig", "MalformedResponseError", "RateLimitedError", "TransientError"]
