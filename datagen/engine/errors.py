"""Failures the engine retries, as opposed to VisinstructError, which stops the run."""
from __future__ import annotations


class TransientError(Exception):
    """A failure worth retrying (5xx, timeout, dropped connection); `retry_after` in seconds if the server said."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class RateLimitedError(TransientError):
    """HTTP 429: the limiter pauses every request, not only this one."""


class MalformedResponseError(TransientError):
    """The server answered 200 with a body that is not a chat completion (truncated JSON, no choices)."""


class EndpointUnreachableError(TransientError):
    """The TCP connection could not be made at all (refused, unknown host)."""
