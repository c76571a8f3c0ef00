"""Each injected fault is retried or fails fast as it should; a faulty run still accounts for every image."""
from __future__ import annotations

import json

import pytest

from datagen.errors import VisinstructError
from datagen.sample import OutputLayout
from engine_support import assert_user_error, datagen, ids_of, run_engine
from fake_openai_server import FakeOpenAIServer, FaultPlan
from guards import INJECTED_HANG_S, REQUEST_TIMEOUT_S


@pytest.mark.parametrize("transport", ["direct", "aiohttp"])
@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout", "drop", "truncated"])
def test_one_transient_fault_is_retried_and_the_item_succeeds(fault, transport, coco_root, tmp_path):
    # The injected hang outlasts the client's timeout by far; the timeout itself is far above a healthy answer's time.
    plan = FaultPlan(script=[fault], retry_after_s=0.05, timeout_sleep_s=INJECTED_HANG_S)
    out = tmp_path / "c.jsonl"
    with FakeOpenAIServer(faults=plan) as server:
        stats = run_engine(server.base_url, out, coco_root, limit=1, concurrency=1, timeout=REQUEST_TIMEOUT_S,
                           transport=transport)
    assert server.state.faults[fault] == 1
    # Every attempt reached the server; the injected fault cost exactly one retry (a busy machine adds none).
    assert stats.requests == server.state.count == 2 and stats.retries == 1 and stats.failed == 0
    assert ids_of(out, OutputLayout(out).rejects) == ["000000000139"]


def test_429_retry_after_is_honoured(coco_root, tmp_path):
    """After a 429 with Retry-After: 0.6, the item is not retried before the 0.6 s are over."""
    plan = FaultPlan(script=["429"], retry_after_s=0.6)
    with FakeOpenAIServer(faults=plan) as server:
        stats = run_engine(server.base_url, tmp_path / "c.jsonl", coco_root, limit=6, concurrency=1)
    times = [r["t"] for r in server.state.requests]
    assert stats.accepted + stats.rejected == 6 and stats.retries == 1
    assert times[1] - times[0] >= 0.55


def test_item_that_exhausts_its_retries_is_recorded_and_a_rerun_retries_only_it(coco_root, tmp_path):
    out = tmp_path / "c.jsonl"
    # The first three requests (all attempts of the first item at --max-retries 2) answer 500.
    plan = FaultPlan(script=["500"] * 3)
    with FakeOpenAIServer(faults=plan) as server:
        stats = run_engine(server.base_url, out, coco_root, limit=5, concurrency=1, max_retries=2)
    assert stats.failed == 1 and stats.accepted + stats.rejected == 4
    failures = [json.loads(line) for line in OutputLayout(out).failures.read_text().splitlines()]
    assert len(failures) == 1 and "HTTP 500" in failures[0]["reason"] and failures[0]["attempts"] == 3
    with FakeOpenAIServer() as server:
        rerun = run_engine(server.base_url, out, coco_root, limit=5, concurrency=1, max_retries=2)
    assert server.state.count == 1 and rerun.skipped == 4 and rerun.failed == 0
    assert sorted(ids_of(out, OutputLayout(out).rejects)) == sorted(set(ids_of(out, OutputLayout(out).rejects)))
    assert len(ids_of(out, OutputLayout(out).rejects)) == 5
    assert not OutputLayout(out).failures.exists()


@pytest.mark.parametrize("transport", ["direct", "aiohttp"])
@pytest.mark.parametrize(
    ("server_kwargs", "run_kwargs", "fragment"),
    [
        ({"api_key": "sk-right"}, {"api_key": "sk-wrong"}, "401"),
        ({"models": {"gpt-4o-mini"}}, {"model": "no-such-model"}, "404"),
    ],
)
def test_wrong_key_or_model_fails_fast_without_retrying(server_kwargs, run_kwargs, fragment, transport, coco_root, tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text('{"id": "000000000001", "image": "x.jpg"}\n')
    with FakeOpenAIServer(**server_kwargs) as server:
        with pytest.raises(VisinstructError, match=fragment):
            # Backoff far longer than the guard: a single retry of a 401/404 would hang the test, not slow it.
            run_engine(server.base_url, out, coco_root, limit=20, concurrency=4, transport=transport,
                       backoff_base_s=INJECTED_HANG_S, backoff_max_s=INJECTED_HANG_S, **run_kwargs)
    assert server.state.count == 0  # refused before the request counted as an attempt
    assert out.read_text() == '{"id": "000000000001", "image": "x.jpg"}\n'


def test_dead_endpoint_is_one_line_error_exit_2(coco_root, tmp_path):
    proc = datagen("generate", "--split", "conversation", "--coco-root", str(coco_root), "--limit", "2",
                   "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "x.jsonl"))
    assert_user_error(proc, "cannot reach the endpoint")


def test_mixed_faults_every_image_accounted_for_once(coco_root, tmp_path):
    """10% 429, 5% 500, 2% timeouts (plus a few drops and truncated bodies) over all 79 images."""
    plan = FaultPlan(rates={"429": 0.10, "500": 0.05, "timeout": 0.02, "drop": 0.01, "truncated": 0.01},
                     seed=7, retry_after_s=0.02, timeout_sleep_s=INJECTED_HANG_S)
    out = tmp_path / "c.jsonl"
    with FakeOpenAIServer(faults=plan, latency_s=0.005) as server:
        stats = run_engine(server.base_url, out, coco_root, concurrency=16, timeout=REQUEST_TIMEOUT_S)
    ids = ids_of(out, OutputLayout(out).rejects)
    assert len(ids) == len(set(ids)) == 79 and stats.failed == 0
    assert server.state.faults["429"] > 0 and server.state.faults["500"] > 0 and server.state.faults["timeout"] > 0
    # One attempt per image plus one per injected fault; a timeout a busy machine adds on a healthy answer is a retry
    # more, never a lost or doubled image.
    assert stats.requests == server.state.count >= 79 + sum(server.state.faults.values())


# --- response bodies: whatever JSON comes back is a Completion or a MalformedResponseError ---------------------

from dataclasses import replace  # noqa: E402

from hypothesis import event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from datagen.backends.base import Completion  # noqa: E402
from datagen.backends.openai_backend import completion_from_body  # noqa: E402
from datagen.engine.errors import MalformedResponseError  # noqa: E402


def _reference_completion(body, fallback_model):
    """The plain reading: every choice in index order, usage on the first, the others with no tokens."""
    try:
        choices = sorted(body["choices"], key=lambda c: int(c.get("index") or 0))
        usage = body.get("usage") or {}
        model = body.get("model") or fallback_model
        made = [Completion(text=c["message"].get("content") or "", finish_reason=c.get("finish_reason") or "stop",
                           prompt_tokens=0, completion_tokens=0, model=model) for c in choices]
        return replace(made[0], prompt_tokens=int(usage.get("prompt_tokens") or 0),
                       completion_tokens=int(usage.get("completion_tokens") or 0), alternatives=tuple(made[1:]))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        return "malformed"


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.text(max_size=4), st.just("12"), st.just(""))
_TEXT = st.one_of(st.text(max_size=6), st.none(), st.just(""))
# Mostly well-formed pieces (so that many bodies read), each of which may be replaced by a stray scalar.
_GOOD_CHOICE = st.fixed_dictionaries({"message": st.fixed_dictionaries({"content": _TEXT})},
                                     optional={"index": st.integers(0, 3), "finish_reason": _TEXT})
_CHOICE = st.one_of(_GOOD_CHOICE, _GOOD_CHOICE, _GOOD_CHOICE,
                    st.fixed_dictionaries({}, optional={"message": _SCALARS, "index": _SCALARS}), _SCALARS)
_USAGE = st.one_of(st.fixed_dictionaries({}, optional={"prompt_tokens": st.one_of(st.integers(0, 9), _SCALARS),
                                                       "completion_tokens": st.one_of(st.integers(0, 9), _SCALARS)}),
                   _SCALARS)
_BODY = st.one_of(
    st.fixed_dictionaries({"choices": st.lists(_GOOD_CHOICE, min_size=1, max_size=3)},
                          optional={"usage": _USAGE, "model": _TEXT}),
    st.fixed_dictionaries({"choices": st.lists(_CHOICE, max_size=3)}, optional={"usage": _USAGE, "model": _TEXT}),
    st.fixed_dictionaries({}, optional={"choices": _SCALARS, "usage": _USAGE}), _SCALARS, st.lists(_SCALARS, max_size=2))


@settings(max_examples=1500, deadline=None)
@given(_BODY)
def test_any_response_body_reads_as_the_plain_reading_or_is_malformed(body):
    expected = _reference_completion(body, "fallback")
    try:
        got = completion_from_body(body, "fallback")
    except MalformedResponseError:
        got = "malformed"
    assert got == expected
    event("read" if got != "malformed" else "malformed")
