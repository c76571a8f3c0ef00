"""Request and token budgets per minute, tightened by the server's x-ratelimit-* headers and 429s."""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """OpenAI's reset durations ("20ms", "1.5s", "6m0s") or plain seconds, in seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    return sum(float(n) * _UNIT_S[u] for n, u in parts) if parts else None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare from LLM servers and treated as absent)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class TokenBucket:
    """Refills at `per_minute / 60` per second up to one second's worth; may go into debt for one big request."""

    def __init__(self, per_minute: float, burst_s: float = 1.0) -> None:
        self.set_rate(per_minute, burst_s)
        self._level = self.capacity
        self._stamp = time.monotonic()

    def set_rate(self, per_minute: float, burst_s: float = 1.0) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)

    def wait_time(self, cost: float) -> float:
        """Seconds until `cost` can be taken (0 = now)."""
        now = time.monotonic()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        need = min(cost, self.capacity)  # a request bigger than the bucket waits for a full bucket, then borrows
        return 0.0 if self._level >= need else (need - self._level) / self.rate

    def take(self, cost: float) -> None:
        self._level -= cost

    def give_back(self, amount: float) -> None:
        """Return an over-reservation (the request used fewer tokens than reserved)."""
        self._level = min(self.capacity, self._level + amount)


class RateLimiter:
    """Paces request starts under rpm/tpm budgets; requests queue in arrival order."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        self._requests = TokenBucket(rpm) if rpm else None
        self._tokens = TokenBucket(tpm) if tpm else None
        self._user_rpm, self._user_tpm = rpm, tpm
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    @property
    def unlimited(self) -> bool:
        return self._requests is None and self._tokens is None and time.monotonic() >= self._paused_until

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request of about `tokens` tokens may start."""
        if self.unlimited:
            return
        async with self._lock:
            while True:
                delay = self._paused_until - time.monotonic()
                if self._requests is not None:
                    delay = max(delay, self._requests.wait_time(1))
                if self._tokens is not None:
                    delay = max(delay, self._tokens.wait_time(tokens))
                if delay <= 0:
                    break
                self.waited_s += delay
                await asyncio.sleep(delay)
            if self._requests is not None:
                self._requests.take(1)
            if self._tokens is not None:
                self._tokens.take(tokens)

    def settle_tokens(self, reserved: int, used: int) -> None:
        """Correct the token bucket once the real usage is known."""
        if self._tokens is not None and reserved > used:
            self._tokens.give_back(reserved - used)
        elif self._tokens is not None:
            self._tokens.take(used - reserved)

    def pause(self, seconds: float) -> None:
        """Hold every request start for `seconds` (a 429's Retry-After, or an exhausted window)."""
        until = time.monotonic() + max(0.0, seconds)
        if until > self._paused_until:
            log.info("rate limited: pausing new requests for %.2fs", seconds)
            self._paused_until = until

    def observe(self, headers: Mapping[str, str]) -> None:
        """Adopt the server's limits when they are tighter than ours; pause when a window is used up."""
        limit_req = _as_float(headers.get("x-ratelimit-limit-requests"))
        if limit_req and (self._user_rpm is None or limit_req < self._user_rpm):
            self._requests = _retune(self._requests, limit_req)
            self._user_rpm = limit_req
        limit_tok = _as_float(headers.get("x-ratelimit-limit-tokens"))
        if limit_tok and (self._user_tpm is None or limit_tok < self._user_tpm):
            self._tokens = _retune(self._tokens, limit_tok)
            self._user_tpm = limit_tok
        for kind in ("requests", "tokens"):
            remaining = _as_float(headers.get(f"x-ratelimit-remaining-{kind}"))
            if remaining is not None and remaining <= 0:
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
                self.pause(reset if reset is not None else 1.0)

    @property
    def rpm(self) -> float | None:
        return self._requests.per_minute if self._requests else None

    @property
    def tpm(self) -> float | None:
        return self._tokens.per_minute if self._tokens else None


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retune(bucket: TokenBucket | None, per_minute: float) -> TokenBucket:
    if bucket is None:
        return TokenBucket(per_minute)
    bucket.set_rate(per_minute)
    return bucket
