"""The judge's log-probability scoring and the local backend's prefilled assistant turn."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest_train import save_tiny_llm
from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.backends.local import LocalBackend, NextTokenLogprobs
from datagen.engine.cache import cache_key
from datagen.errors import VisinstructError
from datagen.judge import (DIGITS, SCORE_PREFIX, JudgeEngine, Scoring, expected_score, judge_file, judged_paths,
                           load_judge_prompts, scale_distribution)


def tiny_backend(folder: Path, seed: int = 0) -> LocalBackend:
    """A LocalBackend built the real way (from a model folder) over a random 2-layer Llama with SmolLM2's tokenizer."""
    return LocalBackend(model=str(save_tiny_llm(folder, seed)), batch_size=4)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> LocalBackend:
    return tiny_backend(tmp_path_factory.mktemp("tiny-judge"))


def chat(user: str, prefix: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Judge."}, {"role": "user", "content": user}]
    return messages + ([{"role": "assistant", "content": prefix}] if prefix is not None else [])


def test_prefill_continues_the_assistant_turn_keeping_trailing_space(shared: LocalBackend) -> None:
    backend = shared
    tok = backend._tokenizer
    open_reply = backend.prompt_text(chat("Rate it.", None))
    prefilled = backend.prompt_text(chat("Rate it.", SCORE_PREFIX))
    assert prefilled == open_reply + SCORE_PREFIX  # ChatML: the reply's header, then the prefix, no end-of-turn
    # The prompt ends where "Score: 7" would put the digit, so the digit is the very next token.
    assert tok.encode(prefilled + "7") == tok.encode(prefilled) + tok.encode("7")
    # A prefix is part of the request's messages, so it is part of the cache key.
    keys = {cache_key("local", "tiny", ChatRequest("k", m)) for m in (chat("x", None), chat("x", "Score:"), chat("x", SCORE_PREFIX))}
    assert len(keys) == 3


def test_generate_continues_a_prefill(shared: LocalBackend) -> None:
    backend = shared
    out = backend.generate_batch([chat("Rate it.", SCORE_PREFIX), chat("Rate this other one, please.", None)],
                                 SamplingParams(temperature=0.0, max_tokens=3))
    assert [c.completion_tokens for c in out] == [3, 3]
    assert out[0].prompt_tokens == len(backend._tokenizer.encode(backend.prompt_text(chat("Rate it.", SCORE_PREFIX))))


@settings(max_examples=6, deadline=None)
@given(st.lists(st.text(alphabet="abc xyz.?", min_size=1, max_size=60), min_size=1, max_size=3))
def test_next_token_logprobs_match_a_plain_forward_in_any_batch(shared: LocalBackend, users: list[str]) -> None:
    """Left padding changes nothing: each row equals a forward pass over that prompt alone, full logits."""
    backend = shared
    tok, lm = backend._tokenizer, backend._lm
    chats = [chat(u, SCORE_PREFIX) for u in users]
    batched = backend.next_token_logprobs(chats, DIGITS, "1")
    for messages, got in zip(chats, batched):
        ids = tok.encode(backend.prompt_text(messages)) + tok.encode("1")
        with torch.inference_mode():
            logprobs = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        assert got.prompt_tokens == len(ids) - 1 and len(got.positions) == 2
        for at, row in zip(got.positions, (logprobs[-2], logprobs[-1])):
            for digit in DIGITS:
                assert at[digit] == pytest.approx(row[tok.convert_tokens_to_ids(digit)].item(), abs=1e-4)


def test_candidates_that_are_not_one_token_are_left_out(shared: LocalBackend) -> None:
    backend = shared
    [result] = backend.next_token_logprobs([chat("x", SCORE_PREFIX)], DIGITS + ("10",))
    assert set(result.positions[0]) == set(DIGITS)  # SmolLM2 writes "10" as "1", "0"


def logs(probs: dict[str, float]) -> dict[str, float]:
    return {d: math.log(p) if p > 0 else -1e9 for d, p in probs.items()}


def digits_with(**probs: float) -> dict[str, float]:
    return logs({d: probs.get(f"d{d}", 0.0) for d in DIGITS})


def test_scale_distribution_by_hand() -> None:
    # All of "Score: " -> 7: score 7, full mass.
    probs, mass = scale_distribution(digits_with(d7=1.0), digits_with())
    assert probs[6] == pytest.approx(1.0) and mass == pytest.approx(1.0) and expected_score(probs) == pytest.approx(7)
    # "1" then "0" half the time (10), "1" then a line break the rest (1); "1" then "5" would be 15: off the scale.
    probs, mass = scale_distribution(digits_with(d1=0.5, d8=0.5), digits_with(d0=0.5, d5=0.2))
    # P(10) = 0.5 * 0.5, P(1) = 0.5 * 0.3, P(8) = 0.5; mass 0.9 of it on the scale.
    assert mass == pytest.approx(0.9)
    assert (probs[0], probs[7], probs[9]) == pytest.approx((0.15 / 0.9, 0.5 / 0.9, 0.25 / 0.9))
    assert expected_score(probs) == pytest.approx((1 * 0.15 + 8 * 0.5 + 10 * 0.25) / 0.9)
    # "0" first is no score on the scale; nothing left means no mass.
    assert scale_distribution(digits_with(d0=1.0), digits_with()) == ([0.0] * 10, 0.0)
    # A tokenizer with a single "10" token adds its probability to 10.
    probs, _ = scale_distribution({**digits_with(d9=0.5), "10": math.log(0.5)}, digits_with())
    assert (probs[8], probs[9]) == pytest.approx((0.5, 0.5))
    with pytest.raises(VisinstructError, match="digits"):
        scale_distribution({"1": 0.0}, digits_with())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=10, max_size=10), st.lists(st.floats(0, 1), min_size=10, max_size=10))
def test_scale_distribution_is_a_distribution_on_1_to_10(first: list[float], after: list[float]) -> None:
    total_first, total_after = sum(first) or 1.0, sum(after) or 1.0
    p = {d: x / total_first for d, x in zip(DIGITS, first)}
    q = {d: x / total_after for d, x in zip(DIGITS, after)}
    probs, mass = scale_distribution(logs(p), logs(q))
    # The on-scale mass: digits 2-9 first, or "1" then "0" (10) or "1" then no digit (1).
    q_digits = min(1.0, sum(q.values()))
    assert mass == pytest.approx(sum(p[str(k)] for k in range(2, 10)) + p["1"] * (q["0"] + 1 - q_digits), abs=1e-9)
    if mass > 1e-12:
        assert sum(probs) == pytest.approx(1.0) and all(x >= 0 for x in probs)
        assert 1.0 - 1e-9 <= expected_score(probs) <= 10.0 + 1e-9


class DigitJudge:
    """A backend with next-token log-probs: after "Score: " it puts most weight on 2 for PLANTED samples, else on 8."""

    name = "digits"
    model = "digit-judge"
    preferred_concurrency = 2
    batch_size = 2
    continues_assistant_prefix = True

    def __init__(self) -> None:
        self.scored = 0
        self.completed: list[list[dict[str, str]]] = []

    def next_token_logprobs(self, conversations, candidates, follow=""):
        out = []
        for messages in conversations:
            assert messages[-1] == {"role": "assistant", "content": SCORE_PREFIX} and follow == "1"
            self.scored += 1
            user = messages[-2]["content"]
            top = "2" if "PLANTED" in user else ("0" if "OFFSCALE" in user else "8")
            first = {c: math.log(0.98 if c == top else 0.002) for c in candidates}
            out.append(NextTokenLogprobs([first, {c: math.log(0.01) for c in candidates}], 100))
        return out

    async def complete(self, request: ChatRequest) -> Completion:
        self.completed.append(request.messages)
        return Completion(" The answers match the description.\nMore text.", "length", 100, 12, self.model)

    async def aclose(self) -> None:
        pass


def sample(i: int, answer: str) -> dict:
    return {"id": f"{i:012d}", "image": f"{i:012d}.jpg", "split": "detail", "context": f"A photo number {i}.",
            "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": answer}]}


def run(source: Path, backend, cache: Path, scoring: Scoring = Scoring.auto, min_score: float = 5):
    return judge_file(source, JudgeEngine(backend, cache, 2), load_judge_prompts(), lambda r: r["context"], min_score,
                      SamplingParams(temperature=0.0, max_tokens=96), scoring=scoring)


def test_logprob_filter_scores_explains_caches_and_refuses_mixing(tmp_path: Path) -> None:
    src = tmp_path / "detail.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in
                           [sample(1, "A cat."), sample(2, "A PLANTED zebra."), sample(3, "OFFSCALE."), sample(4, "A bus.")]))
    backend = DigitJudge()
    stats, accepted, rejected = run(src, backend, tmp_path / "c.sqlite")
    assert (stats.accepted, stats.rejected, stats.unparsed, backend.scored) == (2, 2, 1, 4)
    acc = {json.loads(l)["id"]: json.loads(l)["judge"] for l in accepted.read_text().splitlines()}
    rej = {json.loads(l)["id"]: json.loads(l)["judge"] for l in rejected.read_text().splitlines()}
    good = acc["000000000001"]
    assert good["method"] == "logprobs" and good["reason"] == "The answers match the description."
    assert 7.5 < good["score"] < 8 and sum(good["p"]) == pytest.approx(1, abs=1e-3)
    assert good["score"] == pytest.approx(expected_score(good["p"]), abs=0.01)
    assert rej["000000000002"]["score"] < 3
    assert rej["000000000003"]["score"] is None and "probability" in rej["000000000003"]["reason"]
    # The reason is asked for after the rounded score; the off-scale sample gets no reason call.
    prefixes = sorted(m[-1]["content"] for m in backend.completed)
    assert len(prefixes) == 3 and all(p.startswith(SCORE_PREFIX) and p.endswith("\nReason:") for p in prefixes)
    assert f"{SCORE_PREFIX}8\nReason:" in prefixes and f"{SCORE_PREFIX}2\nReason:" in prefixes
    # A fresh output with the same cache computes nothing again.
    accepted.unlink(), rejected.unlink()
    again = DigitJudge()
    stats2, _, _ = run(src, again, tmp_path / "c.sqlite")
    assert (again.scored, len(again.completed), stats2.cache_hits, stats2.accepted) == (0, 0, 7, 2)
    # Verdicts of one scoring method are not mixed with the other's in one output.
    with pytest.raises(VisinstructError, match="--scoring logprobs"):
        run(src, DigitJudge(), tmp_path / "c.sqlite", scoring=Scoring.reply)


def test_reply_scoring_prefills_score_on_a_local_style_backend(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(sample(1, "A cat.")) + "\n")

    class Continuing(DigitJudge):
        async def complete(self, request):
            self.completed.append(request.messages)
            return Completion("6\nReason: plausible.", "stop", 100, 5, self.model)

    backend = Continuing()
    stats, accepted, _ = run(src, backend, tmp_path / "c.sqlite", scoring=Scoring.reply)
    judge = json.loads(accepted.read_text())["judge"]
    assert (judge["score"], judge["reason"], judge["method"], backend.scored) == (6.0, "plausible.", "reply", 0)
    assert backend.completed[0][-1] == {"role": "assistant", "content": SCORE_PREFIX}


def test_logprobs_refused_for_a_backend_without_them(tmp_path: Path, monkeypatch) -> None:
    import datagen.cli as cli
    import datagen.cli.judge as judge_cli

    class Replying:
        name, model, preferred_concurrency = "openai", "m", 2

        async def complete(self, request):
            return Completion("Score: 7\nReason: ok", "stop", 1, 1, "m")

        async def aclose(self):
            pass

    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(sample(1, "A cat.")) + "\n")
    with pytest.raises(VisinstructError, match="--scoring reply"):
        run(src, Replying(), tmp_path / "c.sqlite", scoring=Scoring.logprobs)
    stats, accepted, _ = run(src, Replying(), tmp_path / "c.sqlite")  # auto: the written score
    assert json.loads(accepted.read_text())["judge"]["method"] == "reply"
    accepted.unlink()
    monkeypatch.setattr(judge_cli, "make_backend", lambda *a, **k: Replying())
    result = CliRunner().invoke(cli.app, ["judge", str(src), "--min-score", "6", "--scoring", "logprobs",
                                          "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "--scoring reply" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not judged_paths(src)[0].exists() or judged_paths(src)[0].read_text() == ""


def test_real_local_backend_through_the_judge(tmp_path: Path) -> None:
    """The tiny real model end to end through the judge: every sample gets a logprob verdict."""
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(sample(i, f"Answer {i}.")) + "\n" for i in range(3)))
    backend = tiny_backend(tmp_path / "model")
    stats, accepted, rejected = run(src, backend, tmp_path / "c.sqlite", min_score=1)
    verdicts = [json.loads(l)["judge"] for p in (accepted, rejected) for l in p.read_text().splitlines()]
    assert len(verdicts) == 3 and all(v["method"] == "logprobs" for v in verdicts)
    # A random model puts little weight on digits: either a score in range, or an honest "no score".
    assert all((v["score"] is None and v["scale_mass"] < 0.05) or 1 <= v["score"] <= 10 for v in verdicts)


def test_score_only_makes_no_reason_calls(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(sample(i, "A cat.")) + "\n" for i in range(3)))
    backend = DigitJudge()
    stats, accepted, _ = judge_file(src, JudgeEngine(backend, None, 2), load_judge_prompts(), lambda r: r["context"], 5,
                                    SamplingParams(temperature=0.0), reason_tokens=0)
    verdicts = [json.loads(l)["judge"] for l in accepted.read_text().splitlines()]
    assert (stats.accepted, backend.scored, backend.completed) == (3, 3, [])
    assert all(v["reason"].startswith("(no reason asked") and v["score"] > 7 for v in verdicts)
