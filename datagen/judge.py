"""An LLM judge: scores samples (or two answers to one question) against the image's symbolic context.

Used two ways: `datagen judge` filters generated data into accepted/rejected files, and the judged
benchmark of `train.eval` compares a model's answers with reference answers (LLaVA-Bench style).
Judge calls go through the same backends and response cache as `datagen generate`, so a rerun pays
nothing for calls already made, and a killed run resumes where it stopped.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from datagen.backends.base import Backend, ChatRequest, Completion, SamplingParams
from datagen.engine.cache import ResponseCache, cache_key
from datagen.engine.errors import EndpointUnreachableError, TransientError
from datagen.errors import VisinstructError
from datagen.jsonl import JsonlWriter, iter_jsonl, repair_tail
from datagen.prompts import default_prompts_dir, files_hash
from datagen.sample import IMAGE_TOKEN, OutputLayout, read_samples

SCORE_MIN, SCORE_MAX = 1.0, 10.0
REASON_CHARS = 240  # the one-line reason kept with each verdict
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w])")
_SCORE_LINE = re.compile(r"score\s*(?:\(1-10\))?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)(?:\s*/\s*10)?", re.IGNORECASE)
_REASON_LINE = re.compile(r"^\W*reason\w*\W*\s*[:=-]\s*(.+)$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class JudgePrompts:
    """The judge's prompt files (prompts/judge/): system message, filter and pairwise-comparison templates."""

    system: str
    filter_template: str
    compare_template: str
    hash: str

    def filter_messages(self, context: str, conversation: str) -> list[dict[str, str]]:
        """Messages asking for one sample's score and reason."""
        user = self.filter_template.replace("{context}", context).replace("{conversation}", conversation)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def compare_messages(self, context: str, question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
        """Messages asking for two scores, one per answer (LLaVA-Bench's review prompt shape)."""
        user = self.compare_template
        # One pass over the placeholders, so text inside an answer is never taken for a placeholder.
        values = {"{context}": context, "{question}": question, "{answer_1}": answer_1, "{answer_2}": answer_2}
        user = re.sub(r"\{context\}|\{question\}|\{answer_1\}|\{answer_2\}", lambda m: values[m.group(0)], user)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def load_judge_prompts(prompts_dir: Path | None = None) -> JudgePrompts:
    """Read prompts/judge/{system,filter,compare}.md and hash them (the hash goes into every verdict)."""
    root = Path(prompts_dir) if prompts_dir else default_prompts_dir()
    folder = root / "judge"
    paths = [folder / "system.md", folder / "filter.md", folder / "compare.md"]
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8").strip())
        except FileNotFoundError:
            raise VisinstructError(f"judge prompt file missing: {path}", "restore prompts/judge/ or pass --prompts-dir") from None
    return JudgePrompts(texts[0], texts[1], texts[2], files_hash(paths, root))


@dataclass(frozen=True)
class Verdict:
    """The judge's score (None when its reply held none) and one-line reason."""

    score: float | None
    reason: str


def _one_line(text: str) -> str:
    return " ".join(text.split())[:REASON_CHARS]


def parse_verdict(text: str) -> Verdict:
    """`Score: 7` / `Reason: ...` replies, and the looser shapes small models write (`7/10 because ...`)."""
    match = _SCORE_LINE.search(text)
    if match is None:
        # No "Score:" label: a number alone at the start of the reply ("8", "8/10 - ...").
        match = re.match(r"\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\b", text)
    score = float(match.group(1)) if match else None
    if score is not None and not SCORE_MIN <= score <= SCORE_MAX:
        score = None
    reason_match = _REASON_LINE.search(text)
    if reason_match:
        reason = reason_match.group(1)
    else:
        rest = text[match.end():] if match else text
        reason = next((line for line in rest.splitlines() if line.strip(" .:-*")), "")
    return Verdict(score, _one_line(reason.strip(" -:*")) or "(no reason given)")


def parse_pair_scores(text: str) -> tuple[float, float] | None:
    """Two scores on the reply's first non-empty line (LLaVA's review format), or labelled ones, else None."""
    # "Assistant 1: 7 ... Assistant 2: 5" anywhere in the reply (the labels' digits are not scores).
    labelled = re.findall(r"assistant\s*([12])\s*[:\-]?\s*(?:score\s*[:=]?\s*)?(\d+(?:\.\d+)?)", text, re.IGNORECASE)
    by_index = {int(k): float(v) for k, v in labelled}
    if set(by_index) == {1, 2}:
        numbers = [by_index[1], by_index[2]]
    else:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        numbers = [float(n) for n in _NUMBER.findall(lines[0].replace(",", " "))] if lines else []
        if len(numbers) != 2:
            return None
    if not all(SCORE_MIN <= n <= SCORE_MAX for n in numbers):
        return None
    return numbers[0], numbers[1]


def render_conversation(record: dict[str, Any]) -> str:
    """A LLaVA sample's turns as `User:` / `Assistant:` lines, without the image placeholder."""
    lines = []
    for turn in record.get("conversations", []):
        who = "User" if turn.get("from") == "human" else "Assistant"
        lines.append(f"{who}: {str(turn.get('value', '')).replace(IMAGE_TOKEN, '').strip()}")
    return "\n".join(lines)


@dataclass
class JudgeEngine:
    """Runs judge requests through a backend with the response cache and retries of generation."""

    backend: Backend
    cache_path: Path | None = None
    concurrency: int = 8
    max_retries: int = 6
    backoff_base_s: float = 0.5
    calls: int = 0
    cache_hits: int = 0
    _successes: int = field(default=0, repr=False)

    async def _complete(self, request: ChatRequest) -> Completion:
        retrying = AsyncRetrying(stop=stop_after_attempt(self.max_retries + 1),
                                 wait=wait_random_exponential(multiplier=self.backoff_base_s, max=60.0),
                                 retry=retry_if_exception_type(TransientError), reraise=True)
        async for attempt in retrying:
            with attempt:
                self.calls += 1
                try:
                    completion = await self.backend.complete(request)
                except EndpointUnreachableError as exc:
                    if self._successes == 0 and attempt.retry_state.attempt_number >= 3:
                        raise VisinstructError(f"cannot reach the judge endpoint ({exc.reason})",
                                               "start the server or fix --base-url") from None
                    raise
                self._successes += 1
                return completion
        raise AssertionError("unreachable")  # tenacity returns or raises

    async def run(self, requests: list[ChatRequest],
                  on_result: Callable[[int, Completion | None, str], None]) -> None:
        """Complete every request (cached ones from the cache); `on_result(i, completion, failure)` as each ends."""
        cache = ResponseCache(self.cache_path) if self.cache_path else None
        keys = [cache_key(self.backend.name, self.backend.model, r) for r in requests]
        slots = asyncio.Semaphore(max(1, self.concurrency))

        async def one(i: int) -> None:
            cached = cache.get(keys[i]) if cache is not None else None
            if cached is not None:
                self.cache_hits += 1
                on_result(i, cached, "")
                return
            async with slots:
                try:
                    completion = await self._complete(requests[i])
                except VisinstructError:
                    raise
                except Exception as exc:  # retries exhausted: this item fails, the others go on
                    on_result(i, None, getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")
                    return
            if cache is not None:  # stored before it is used, so a crash never pays for it twice
                cache.put_many([(keys[i], self.backend.name, self.backend.model, requests[i].key, completion)])
            on_result(i, completion, "")

        try:
            await asyncio.gather(*(one(i) for i in range(len(requests))))
        finally:
            if cache is not None:
                cache.close()


def judged_paths(source: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """data/detail.jsonl -> data/detail.judged.jsonl and data/detail.judge-rejects.jsonl (or in out_dir)."""
    stem = source.name.removesuffix(".jsonl").removesuffix(".json")
    layout = OutputLayout((Path(out_dir) if out_dir else source.parent) / f"{stem}.jsonl")
    return layout.judged, layout.judge_rejects


@dataclass
class JudgeStats:
    """What a `datagen judge` run did."""

    accepted: int = 0
    rejected: int = 0
    unparsed: int = 0  # rejected because the judge's reply held no score
    failed: int = 0  # judge calls that exhausted their retries (not written: a rerun retries them)
    skipped: int = 0  # already judged by an earlier run
    cache_hits: int = 0
    scores: list[float] = field(default_factory=list)


def _done_ids(paths: Iterable[Path], min_score: float, model: str) -> set[str]:
    """Ids judged by earlier runs; refuses to mix verdicts of another threshold or judge model in one file."""
    done: set[str] = set()
    for path in paths:
        if not path.exists():
            continue
        repair_tail(path)
        for record in iter_jsonl(path):
            judge = record.get("judge") or {}
            if judge.get("min_score") != min_score or judge.get("model") != model:
                raise VisinstructError(
                    f"{path} holds verdicts made with --min-score {judge.get('min_score')} by {judge.get('model')!r}",
                    "rerun with those settings to resume, or pass another --out-dir")
            done.add(str(record.get("id")))
    return done


def judge_file(source: Path, engine: JudgeEngine, prompts: JudgePrompts, context_of: Callable[[dict[str, Any]], str],
               min_score: float, params: SamplingParams, out_dir: Path | None = None,
               on_progress: Callable[[JudgeStats], None] | None = None) -> tuple[JudgeStats, Path, Path]:
    """Judge every sample of a LLaVA-format JSONL file into accepted (score >= min_score) and rejected files."""
    if not source.is_file():
        raise VisinstructError(f"input file not found: {source}", "pass a JSONL file written by `datagen generate`")
    accepted_path, rejected_path = judged_paths(source, out_dir)
    if source.resolve() in (accepted_path.resolve(), rejected_path.resolve()):
        raise VisinstructError(f"{source} is a judge output file", "judge the generated file, not its judged copy")
    model = engine.backend.model
    done = _done_ids([accepted_path, rejected_path], min_score, model)
    stats = JudgeStats()
    records: list[dict[str, Any]] = []
    for record in read_samples(source):
        if str(record.get("id")) in done:
            stats.skipped += 1
        else:
            records.append(record)
    requests = [ChatRequest(key=f"judge:{r.get('id')}",
                            messages=prompts.filter_messages(context_of(r), render_conversation(r)), params=params)
                for r in records]
    accepted, rejected = JsonlWriter(accepted_path), JsonlWriter(rejected_path)

    def store(i: int, completion: Completion | None, failure: str) -> None:
        if completion is None:
            stats.failed += 1
        else:
            verdict = parse_verdict(completion.text)
            keep = verdict.score is not None and verdict.score >= min_score
            stats.unparsed += verdict.score is None
            if verdict.score is not None:
                stats.scores.append(verdict.score)
            judge = {"score": verdict.score, "reason": verdict.reason if verdict.score is not None else
                     f"judge reply held no score: {_one_line(completion.text)[:120]!r}",
                     "min_score": min_score, "model": model, "prompt_hash": prompts.hash}
            (accepted if keep else rejected).write({**records[i], "judge": judge})
            if keep:
                stats.accepted += 1
            else:
                stats.rejected += 1
        if on_progress:
            on_progress(stats)

    try:
        asyncio.run(_run_and_close(engine, requests, store))
    finally:
        accepted.close()
        rejected.close()
    stats.cache_hits = engine.cache_hits
    return stats, accepted_path, rejected_path


async def _run_and_close(engine: JudgeEngine, requests: list[ChatRequest],
                         on_result: Callable[[int, Completion | None, str], None]) -> None:
    try:
        await engine.run(requests, on_result)
    finally:
        await engine.backend.aclose()


def image_id_from_name(name: str) -> int | None:
    """The COCO image id in a file name: `000000000139.jpg` and `COCO_val2014_000000000139.jpg` give 139."""
    match = re.search(r"(\d+)(?:\.[A-Za-z0-9]+)?$", Path(name).name)
    return int(match.group(1)) if match else None


def coco_context_lookup(coco_root: Path | None, coco_split: str) -> Callable[[dict[str, Any]], str]:
    """Context of a sample: its own `context` field (rejects files carry one), else rendered from COCO with boxes."""
    indexes: list[Any] = []  # the COCO index, loaded on the first sample that needs it

    def context_of(record: dict[str, Any]) -> str:
        if isinstance(record.get("context"), str):
            return record["context"]
        if coco_root is None:
            raise VisinstructError(f"sample {record.get('id')} carries no context and no COCO root was given",
                                   "pass --coco-root (or set $COCO_ROOT) and --coco-split of the images")
        from datagen.coco import CocoIndex  # pycocotools: loaded only when a context must be rendered
        from datagen.context import render_context

        if not indexes:
            indexes.append(CocoIndex(coco_root, coco_split, with_instances=True))
        image_id = image_id_from_name(str(record.get("image", "")))
        if image_id is None:
            raise VisinstructError(f"sample {record.get('id')}: no COCO image id in its image name {record.get('image')!r}",
                                   "judge samples of COCO images, or add a `context` field to each sample")
        # The judge sees the boxes for every split: more of the truth to check the answers against.
        return render_context(indexes[0].record(image_id), with_boxes=True)

    return context_of


def run_judge(source: Path, backend: Backend, min_score: float, coco_root: Path | None = None,
              coco_split: str = "val2017", out_dir: Path | None = None, cache_path: Path | None = None,
              concurrency: int | None = None, max_tokens: int = 96, prompts_dir: Path | None = None) -> str:
    """`datagen judge`: judge a file and return the summary line to print."""
    if not SCORE_MIN <= min_score <= SCORE_MAX:
        raise VisinstructError(f"--min-score {min_score} is outside the judge's scale", "pass a score from 1 to 10")
    engine = JudgeEngine(backend, cache_path, concurrency or backend.preferred_concurrency)
    # Greedy, so a verdict is a function of the sample and the prompt (and the cache key stays stable).
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    stats, accepted, rejected = judge_file(source, engine, load_judge_prompts(prompts_dir),
                                           coco_context_lookup(coco_root, coco_split), min_score, params, out_dir)
    mean = f"{sum(stats.scores) / len(stats.scores):.2f}" if stats.scores else "n/a"
    return (f"judged {stats.accepted + stats.rejected} samples ({stats.skipped} already done, {stats.cache_hits} from cache): "
            f"{stats.accepted} accepted -> {accepted}, {stats.rejected} rejected -> {rejected} "
            f"({stats.unparsed} without a score); mean score {mean}; {stats.failed} failed (rerun to retry)")
