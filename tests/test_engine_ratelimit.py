"""The rate limiter paces request starts, adopts the server's limits and pauses on exhausted windows."""
from __future__ import annotations

import asyncio
import time

import pytest

from datagen.engine.ratelimit import RateLimiter, parse_reset, parse_retry_after
from engine_support import run_engine
from fake_openai_server import FakeOpenAIServer


def time_acquires(limiter: RateLimiter, count: int, tokens: int = 0, concurrent: bool = True) -> float:
    async def go() -> float:
        started = time.monotonic()
        if concurrent:
            await asyncio.gather(*(limiter.acquire(tokens) for _ in range(count)))
        else:
            for _ in range(count):
                await limiter.acquire(tokens)
        return time.monotonic() - started

    return asyncio.run(go())


def test_requests_per_minute_pacing_has_a_lower_bound():
    # 600 rpm = 10/s with a one-second burst of 10: 30 starts need at least 2 s.
    assert time_acquires(RateLimiter(rpm=600), 30) >= 1.9


def test_tokens_per_minute_pacing_has_a_lower_bound():
    # 60,000 tpm = 1,000 tokens/s, burst 1,000: eight 500-token requests need at least 3 s.
    assert time_acquires(RateLimiter(tpm=60_000), 8, tokens=500) >= 2.9


def test_unlimited_limiter_does_not_wait():
    limiter = RateLimiter()
    time_acquires(limiter, 1000)
    assert limiter.waited_s == 0.0  # counted, not timed: a busy machine cannot fail it


def test_pause_holds_every_start():
    limiter = RateLimiter()

    async def go() -> float:
        limiter.pause(0.5)
        started = time.monotonic()
        await asyncio.gather(*(limiter.acquire() for _ in range(5)))
        return time.monotonic() - started

    assert asyncio.run(go()) >= 0.45


def test_server_headers_tighten_the_limits_and_an_empty_window_pauses():
    limiter = RateLimiter(rpm=10_000)
    limiter.observe({"x-ratelimit-limit-requests": "500", "x-ratelimit-limit-tokens": "200000",
                     "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "300ms"})
    assert limiter.rpm == 500 and limiter.tpm == 200_000
    limiter.observe({"x-ratelimit-limit-requests": "90000"})  # never loosened past the user's or server's tighter value
    assert limiter.rpm == 500
    assert time_acquires(limiter, 1, concurrent=False) >= 0.25


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1.5", 1.5), ("2h", 7200.0),
                                               ("", None), ("soon", None)])
def test_parse_reset(text, seconds):
    assert parse_reset(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


def test_engine_run_is_paced_by_rpm(coco_root, tmp_path):
    # 12 requests at 240 rpm (4/s, burst 4): at least (12 - 4) / 4 = 2 s.
    with FakeOpenAIServer() as server:
        stats = run_engine(server.base_url, tmp_path / "c.jsonl", coco_root, limit=12, concurrency=12, rpm=240)
    times = sorted(r["t"] for r in server.state.requests)
    assert stats.requests == 12 and times[-1] - times[0] >= 1.9


def test_engine_adopts_rate_limit_headers(coco_root, tmp_path):
    headers = {"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "100"}
    # The first answer says 120 rpm (2/s, burst 2): the remaining 7 of 8 requests take at least ~2.5 s.
    with FakeOpenAIServer(ratelimit_headers=headers) as server:
        stats = run_engine(server.base_url, tmp_path / "c.jsonl", coco_root, limit=8, concurrency=1)
    times = sorted(r["t"] for r in server.state.requests)
    assert stats.requests == 8 and times[-1] - times[0] >= 2.0
