"""The LLM judge: reply parsing, the filter's accepted/rejected files, cache and resume, the CLI command."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.errors import VisinstructError
from datagen.judge import (JudgeEngine, judge_file, judged_paths, load_judge_prompts, parse_pair_scores, parse_verdict,
                           render_conversation)
from train.eval.bench import BenchItem, Judged, bench_items, relative_scores


@pytest.mark.parametrize("reply, score, reason", [
    ("Score: 8\nReason: Accurate and grounded.", 8.0, "Accurate and grounded."),
    ("score: 3/10\nreason - mentions a dog that is not there", 3.0, "mentions a dog that is not there"),
    ("**Score:** 7\n**Reason:** fine", 7.0, "fine"),
    ("9\nThe answers match the captions.", 9.0, "The answers match the captions."),
    ("6/10 - mostly right but vague", 6.0, "mostly right but vague"),
    ("Score: 11\nReason: off the scale", None, "off the scale"),
    ("I think the answers are good.", None, "I think the answers are good."),
    ("", None, "(no reason given)"),
    ("Score: 4\nReason: <one sentence>", 4.0, "(no reason given)"),  # the format's placeholder echoed back
])
def test_parse_verdict(reply: str, score, reason: str) -> None:
    verdict = parse_verdict(reply)
    assert verdict.score == score and verdict.reason == reason
    assert "\n" not in verdict.reason


@pytest.mark.parametrize("reply, pair", [
    ("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)), ("7, 9\nreason", (7.0, 9.0)), ("\n 10 3.5 \n", (10.0, 3.5)),
    ("Assistant 1: 8\nAssistant 2: 4\nBecause.", (8.0, 4.0)), ("8\nreason", None), ("12 3", None), ("", None),
])
def test_parse_pair_scores(reply: str, pair) -> None:
    assert parse_pair_scores(reply) == pair


class ScriptedJudge:
    """A judge backend that scores a conversation 2 if it holds the word PLANTED, else 8."""

    name = "scripted"
    model = "judge-1"
    preferred_concurrency = 4

    def __init__(self, garble: set[str] = frozenset()) -> None:
        self.calls = 0
        self.garble = garble

    async def complete(self, request: ChatRequest) -> Completion:
        self.calls += 1
        text = request.messages[-1]["content"]
        if any(word in text for word in self.garble):
            reply = "I cannot decide."
        elif "PLANTED" in text:
            reply = "Score: 2\nReason: names an object the description lacks."
        else:
            reply = "Score: 8\nReason: grounded and helpful."
        return Completion(reply, "stop", 10, 5, self.model)

    async def aclose(self) -> None:
        pass


def sample(i: int, answer: str) -> dict:
    return {"id": f"{i:012d}", "image": f"{i:012d}.jpg", "split": "detail", "context": f"A photo number {i}.",
            "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": answer}]}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_filter(source: Path, backend, min_score: float = 5, cache: Path | None = None):
    engine = JudgeEngine(backend, cache, 4)
    params = SamplingParams(temperature=0.0, max_tokens=64)
    return judge_file(source, engine, load_judge_prompts(), lambda r: r["context"], min_score, params)


def test_filter_splits_writes_reasons_caches_and_resumes(tmp_path: Path) -> None:
    src = write(tmp_path / "detail.jsonl", [sample(1, "A cat on a sofa."), sample(2, "A PLANTED giraffe."),
                                              sample(3, "UNSURE text."), sample(4, "A bus.")])
    cache = tmp_path / "cache.sqlite"
    backend = ScriptedJudge(garble={"UNSURE"})
    stats, accepted, rejected = run_filter(src, backend, cache=cache)
    assert (accepted, rejected) == judged_paths(src)
    assert (stats.accepted, stats.rejected, stats.unparsed, backend.calls) == (2, 2, 1, 4)
    acc = [json.loads(l) for l in accepted.read_text().splitlines()]
    rej = {json.loads(l)["id"]: json.loads(l)["judge"] for l in rejected.read_text().splitlines()}
    assert [r["id"] for r in acc] == ["000000000001", "000000000004"] and acc[0]["judge"]["score"] == 8
    assert rej["000000000002"]["score"] == 2 and rej["000000000002"]["reason"].startswith("names an object")
    assert rej["000000000003"]["score"] is None and "no score" in rej["000000000003"]["reason"]
    # Rerun: nothing new is judged. A fresh output folder with the same cache pays for nothing.
    again = ScriptedJudge(garble={"UNSURE"})
    stats2, _, _ = run_filter(src, again, cache=cache)
    assert (stats2.skipped, again.calls) == (4, 0)
    accepted.unlink(), rejected.unlink()
    third = ScriptedJudge(garble={"UNSURE"})
    stats3, _, _ = run_filter(src, third, cache=cache)
    assert (third.calls, stats3.cache_hits, stats3.accepted) == (0, 4, 2)


def test_filter_refuses_mixing_thresholds_and_bad_input(tmp_path: Path) -> None:
    src = write(tmp_path / "d.jsonl", [sample(1, "A cat.")])
    run_filter(src, ScriptedJudge())
    with pytest.raises(VisinstructError, match="--min-score 5"):
        run_filter(src, ScriptedJudge(), min_score=7)
    with pytest.raises(VisinstructError, match="not found"):
        run_filter(tmp_path / "missing.jsonl", ScriptedJudge())


def test_killed_run_resumes_without_repaying(tmp_path: Path) -> None:
    """A judge that dies after two calls: the verdicts made are kept, the rerun judges only the rest."""
    src = write(tmp_path / "d.jsonl", [sample(i, "A cat.") for i in range(1, 6)])

    class Dying(ScriptedJudge):
        async def complete(self, request):
            if self.calls >= 2:
                raise KeyboardInterrupt
            return await super().complete(request)

    engine = JudgeEngine(Dying(), tmp_path / "c.sqlite", 1)
    with pytest.raises(KeyboardInterrupt):
        judge_file(src, engine, load_judge_prompts(), lambda r: r["context"], 5, SamplingParams(temperature=0.0))
    accepted, _ = judged_paths(src)
    assert len(accepted.read_text().splitlines()) == 2
    rest = ScriptedJudge()
    stats, _, _ = run_filter(src, rest, cache=tmp_path / "c.sqlite")
    assert (stats.skipped, rest.calls, stats.accepted) == (2, 3, 3)


def test_prompt_placeholders_filled_once() -> None:
    prompts = load_judge_prompts()
    messages = prompts.compare_messages("CTX", "Q?", "answer with {answer_2} inside", "B")
    user = messages[-1]["content"]
    assert "CTX" in user and "Q?" in user and "answer with {answer_2} inside" in user and "{context}" not in user
    conv = render_conversation(sample(1, "A cat."))
    assert conv == "User: Describe it.\nAssistant: A cat."


def test_cli_judge_command(tmp_path: Path, monkeypatch) -> None:
    import datagen.cli as cli
    import datagen.cli.judge as judge_cli

    src = write(tmp_path / "detail.jsonl", [sample(1, "A cat."), sample(2, "A PLANTED zebra.")])
    monkeypatch.setattr(judge_cli, "make_backend", lambda *a, **k: ScriptedJudge())
    result = CliRunner().invoke(cli.app, ["judge", str(src), "--min-score", "6", "--model", "judge-1",
                                          "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 0, result.output
    assert "1 accepted" in result.output and "1 rejected" in result.output
    bad = CliRunner().invoke(cli.app, ["judge", str(src), "--min-score", "11"])
    assert bad.exit_code == 2
    vllm = CliRunner().invoke(cli.app, ["judge", str(src), "--min-score", "6", "--backend", "vllm"])
    assert vllm.exit_code == 2 and "--backend openai" in vllm.stderr and vllm.stderr.count("\n") == 1


def test_bench_items_and_relative_scores() -> None:
    records = [sample(1, "A cat."), {**sample(2, "Two dogs."), "split": "reasoning"}, {"id": "x", "conversations": []}]
    items = bench_items(records)
    assert [(i.split, i.question, i.reference) for i in items] == [("detail", "Describe it.", "A cat."),
                                                                  ("reasoning", "Describe it.", "Two dogs.")]
    judged = [Judged(items[0], "a", 8, 4, ""), Judged(items[0], "b", 6, 6, ""), Judged(items[1], "c", None, None, "?")]
    scores = relative_scores(judged)
    assert scores["detail"]["relative_score"] == pytest.approx(100 * 10 / 14)
    assert scores["reasoning"] == {"items": 1, "judged": 0, "unparsed": 1, "reference_mean": None, "model_mean": None,
                                   "relative_score": None}
    assert scores["all"]["judged"] == 2
