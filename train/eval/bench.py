"""A judged benchmark in LLaVA-Bench's style: held-out generated samples as questions and reference
answers, the model's answers, and a text-only judge scoring both from the image's symbolic context.

The relative score of a split is sum(model scores) / sum(reference scores) x 100, as LLaVA reported it.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from datagen.backends.base import Backend, ChatRequest, Completion, SamplingParams
from datagen.errors import VisinstructError
from datagen.judge import JudgeEngine, JudgePrompts, parse_pair_scores
from datagen.sample import IMAGE_TOKEN

SPLITS = ("conversation", "detail", "reasoning")


@dataclass(frozen=True)
class BenchItem:
    """One question of the benchmark with its reference answer."""

    sample_id: str
    image: str
    split: str
    question: str
    reference: str


def split_of(record: dict[str, Any]) -> str:
    """The sample's split (`split` field, else the `-<split>` suffix of its id), or "other"."""
    split = record.get("split") or (record.get("meta") or {}).get("split")
    if split in SPLITS:
        return str(split)
    suffix = str(record.get("id", "")).rsplit("-", 1)[-1]
    return suffix if suffix in SPLITS else "other"


def bench_items(records: list[dict[str, Any]]) -> list[BenchItem]:
    """The first question and answer of each image sample (one question per sample, as LLaVA-Bench)."""
    items = []
    for record in records:
        turns = record.get("conversations") or []
        if not record.get("image") or len(turns) < 2:
            continue
        question = str(turns[0].get("value", "")).replace(IMAGE_TOKEN, "").strip()
        reference = str(turns[1].get("value", "")).strip()
        if question and reference:
            items.append(BenchItem(str(record.get("id")), str(record["image"]), split_of(record), question, reference))
    return items


@dataclass(frozen=True)
class Judged:
    """The judge's two scores for one item (None when its reply held no pair of scores)."""

    item: BenchItem
    answer: str
    reference_score: float | None
    model_score: float | None
    judge_text: str


def judge_answers(items: list[BenchItem], answers: list[str], context_of: Callable[[BenchItem], str],
                  backend: Backend, prompts: JudgePrompts, cache_path: Path | None, max_tokens: int = 128) -> list[Judged]:
    """Ask the judge to score the reference (assistant 1) and the model (assistant 2) for every item."""
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    requests = [ChatRequest(key=f"bench:{item.sample_id}",
                            messages=prompts.compare_messages(context_of(item), item.question, item.reference, answer),
                            params=params)
                for item, answer in zip(items, answers, strict=True)]
    replies: dict[int, tuple[Completion | None, str]] = {}
    engine = JudgeEngine(backend, cache_path, backend.preferred_concurrency)

    async def run() -> None:
        try:
            await engine.run(requests, lambda i, completion, failure: replies.__setitem__(i, (completion, failure)))
        finally:
            await backend.aclose()

    asyncio.run(run())
    judged = []
    for i, (item, answer) in enumerate(zip(items, answers)):
        completion, failure = replies[i]
        if completion is None:
            raise VisinstructError(f"the judge call for {item.sample_id} failed ({failure})", "rerun: finished calls come from the cache")
        pair = parse_pair_scores(completion.text)
        judged.append(Judged(item, answer, pair[0] if pair else None, pair[1] if pair else None, completion.text))
    return judged


def relative_scores(judged: list[Judged]) -> dict[str, dict[str, Any]]:
    """Per split and overall: items, judged items, mean scores and the relative score (model / reference, %)."""
    out: dict[str, dict[str, Any]] = {}
    groups = {split: [j for j in judged if j.item.split == split] for split in sorted({j.item.split for j in judged})}
    groups["all"] = list(judged)
    for split, rows in groups.items():
        scored = [j for j in rows if j.reference_score is not None]
        ref = sum(j.reference_score for j in scored)
        mod = sum(j.model_score for j in scored)
        out[split] = {
            "items": len(rows), "judged": len(scored), "unparsed": len(rows) - len(scored),
            "reference_mean": ref / len(scored) if scored else None,
            "model_mean": mod / len(scored) if scored else None,
            "relative_score": 100.0 * mod / ref if ref else None,
        }
    return out
