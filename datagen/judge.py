"""An LLM judge: scores samples (or two answers to one question) against the image's symbolic context.

Used two ways: `datagen judge` filters generated data into accepted/rejected files, and the judged
benchmark of `train.eval` compares a model's answers with reference answers (LLaVA-Bench style).
Judge calls go through the same backends and response cache as `datagen generate`, so a rerun pays
nothing for calls already made, and a killed run resumes where it stopped.

Two ways to get a filter score (`Scoring`): `reply` parses the score the judge writes (an endpoint's model);
`logprobs` (a local model: the backend offers `next_token_logprobs`) prefills the reply with "Score: " and
reads the model's next-token probabilities of the digits, the score being their expectation over 1-10
(G-Eval's probability-weighted score, Liu et al. 2023). A small model that would not write a number in
free text still has a distribution over the digits after that prefix; one forward pass, no sampling.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from datagen.backends.base import Backend, ChatRequest, Completion, SamplingParams
from datagen.engine.cache import ResponseCache, cache_key
from datagen.engine.errors import EndpointUnreachableError, TransientError
from datagen.errors import VisinstructError
from datagen.inputs import read_text
from datagen.jsonl import JsonlWriter, iter_jsonl, repair_tail
from datagen.outputs import OutputLock
from datagen.prompts import default_prompts_dir, files_hash
from datagen.sample import IMAGE_TOKEN, OutputLayout, read_samples

SCORE_MIN, SCORE_MAX = 1.0, 10.0
REASON_CHARS = 240  # the one-line reason kept with each verdict
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w])")
_SCORE_LINE = re.compile(r"score\s*(?:\(1-10\))?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)(?:\s*/\s*10)?", re.IGNORECASE)
_REASON_LINE = re.compile(r"^\W*reason\w*\W*\s*[:=-]\s*(.+)$", re.IGNORECASE | re.MULTILINE)
SCORE_PREFIX = "Score: "  # the filter prompt's reply format; prefilled so the next token is the score
DIGITS = tuple(str(d) for d in range(10))
# Asked for after "Score: " and after "Score: 1": digits (and "10", for tokenizers that keep it one token).
SCALE_CANDIDATES = DIGITS + ("10",)
MIN_SCALE_MASS = 0.05  # below this the model was not about to write a score at all: no verdict
REASON_TOKENS = 40  # logprobs scoring: default length of the one-line reason the model writes after its score


class Scoring(str, Enum):
    """How a filter score is read: auto = logprobs where the backend offers them (local), else reply."""

    auto = "auto"
    reply = "reply"
    logprobs = "logprobs"


def resolve_scoring(scoring: Scoring, backend: Backend) -> Scoring:
    """The method a backend can do: logprobs need a backend with `next_token_logprobs` (the local one)."""
    has_logprobs = callable(getattr(backend, "next_token_logprobs", None))
    if scoring is Scoring.auto:
        return Scoring.logprobs if has_logprobs else Scoring.reply
    if scoring is Scoring.logprobs and not has_logprobs:
        raise VisinstructError(f"the {backend.name} backend gives no next-token log-probabilities",
                               "use --scoring reply (the judge writes its score) or the local backend")
    return scoring


def scale_distribution(first: dict[str, float], after_one: dict[str, float]) -> tuple[list[float], float]:
    """P(score = k), k = 1..10, from next-token log-probs after "Score: " (`first`) and after "Score: 1"
    (`after_one`), normalised over the scale; and the probability mass the scale had before normalising.

    "1" followed by "0" is 10, "1" followed by another digit is off the scale (11-19), "1" followed by
    anything else is 1; "0" first is off the scale. A tokenizer with "10" as one token adds that too."""
    p = {d: math.exp(v) for d, v in first.items()}
    q = {d: math.exp(v) for d, v in after_one.items()}
    missing = [d for d in DIGITS if d not in p or d not in q]
    if missing:
        raise VisinstructError(f"no log-probabilities for the digits {missing}", "use --scoring reply with this model")
    one_then_digit = min(1.0, sum(q[d] for d in DIGITS))
    mass = [p["1"] * (1.0 - one_then_digit)] + [p[str(k)] for k in range(2, 10)] + [p["1"] * q["0"] + p.get("10", 0.0)]
    total = sum(mass)
    if total <= 0.0:
        return [0.0] * 10, 0.0
    return [m / total for m in mass], total


def expected_score(probs: list[float]) -> float:
    """The probability-weighted score over 1..10."""
    return sum(k * pk for k, pk in zip(range(1, 11), probs))


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
        if not path.exists():
            raise VisinstructError(f"judge prompt file missing: {path}", "restore prompts/judge/ or pass --prompts-dir")
        texts.append(read_text(path, "judge prompt file").strip())
    return JudgePrompts(texts[0], texts[1], texts[2], files_hash(paths, root))


@dataclass(frozen=True)
class Verdict:
    """The judge's score (None when its reply held none) and one-line reason."""

    score: float | None
    reason: str


def _one_line(text: str) -> str:
    return " ".join(text.split())[:REASON_CHARS]


def _reason(text: str) -> str:
    """The reason as one line; empty when it only echoes a placeholder of the reply format (`<one sentence>`)."""
    line = _one_line(text.strip(" -:*"))
    return "" if re.fullmatch(r"<[^<>]*>\.?", line) else line


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
    return Verdict(score, _reason(reason) or "(no reason given)")


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

    async def run_logprobs(self, requests: list[ChatRequest], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        """Score-digit log-probabilities after each request's prefilled assistant turn, in the backend's batches;
        cached like completions (under the backend name + ":logprobs", so never mistaken for a reply)."""
        cache = ResponseCache(self.cache_path) if self.cache_path else None
        tag = f"{self.backend.name}:logprobs"
        keys = [cache_key(tag, self.backend.model, r) for r in requests]
        todo = []
        try:
            for i, key in enumerate(keys):
                cached = cache.get(key) if cache is not None else None
                if cached is None:
                    todo.append(i)
                    continue
                self.cache_hits += 1
                on_result(i, json.loads(cached.text))
            size = max(1, int(getattr(self.backend, "batch_size", 8)))
            for start in range(0, len(todo), size):
                chunk = todo[start:start + size]
                self.calls += len(chunk)
                results = await asyncio.to_thread(self.backend.next_token_logprobs,  # type: ignore[attr-defined]
                                                  [requests[i].messages for i in chunk], SCALE_CANDIDATES, "1")
                payloads = [{"positions": r.positions} for r in results]
                if cache is not None:  # stored before it is used, so a crash never computes it twice
                    cache.put_many([(keys[i], tag, self.backend.model, requests[i].key,
                                     Completion(json.dumps(payload), "logprobs", r.prompt_tokens, 0, self.backend.model))
                                    for i, payload, r in zip(chunk, payloads, results)])
                for i, payload in zip(chunk, payloads):
                    on_result(i, payload)
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


def _done_ids(paths: Iterable[Path], min_score: float, model: str, method: Scoring) -> set[str]:
    """Ids judged by earlier runs; refuses to mix verdicts of another threshold, judge model or scoring in one file."""
    done: set[str] = set()
    for path in paths:
        if not path.exists():
            continue
        repair_tail(path)
        for record in iter_jsonl(path):
            judge = record.get("judge") or {}
            earlier = judge.get("method", Scoring.reply.value)
            if judge.get("min_score") != min_score or judge.get("model") != model or earlier != method.value:
                raise VisinstructError(
                    f"{path} holds verdicts made with --min-score {judge.get('min_score')} by {judge.get('model')!r} "
                    f"(--scoring {earlier})", "rerun with those settings to resume, or pass another --out-dir")
            done.add(str(record.get("id")))
    return done


def judge_file(source: Path, engine: JudgeEngine, prompts: JudgePrompts, context_of: Callable[[dict[str, Any]], str],
               min_score: float, params: SamplingParams, out_dir: Path | None = None,
               on_progress: Callable[[JudgeStats], None] | None = None,
               scoring: Scoring = Scoring.auto, reason_tokens: int = REASON_TOKENS) -> tuple[JudgeStats, Path, Path]:
    """Judge every sample of a LLaVA-format JSONL file into accepted (score >= min_score) and rejected files."""
    if not source.is_file():
        raise VisinstructError(f"input file not found: {source}", "pass a JSONL file written by `datagen generate`")
    accepted_path, rejected_path = judged_paths(source, out_dir)
    if source.resolve() in (accepted_path.resolve(), rejected_path.resolve()):
        raise VisinstructError(f"{source} is a judge output file", "judge the generated file, not its judged copy")
    # The judged files are appended to (and a half-written tail cut) under their lock: two judges of one
    # input would write every verdict twice.
    with OutputLock(accepted_path):
        model = engine.backend.model
        method = resolve_scoring(scoring, engine.backend)
        done = _done_ids([accepted_path, rejected_path], min_score, model, method)
        stats = JudgeStats()
        records: list[dict[str, Any]] = []
        for record in read_samples(source):
            if str(record.get("id")) in done:
                stats.skipped += 1
            else:
                records.append(record)
        messages = [prompts.filter_messages(context_of(r), render_conversation(r)) for r in records]
        accepted, rejected = JsonlWriter(accepted_path), JsonlWriter(rejected_path)

        def write(i: int, score: float | None, reason: str, extra: dict[str, Any]) -> None:
            keep = score is not None and score >= min_score
            stats.unparsed += score is None
            if score is not None:
                stats.scores.append(score)
            judge = {"score": score, "reason": reason, "min_score": min_score, "model": model,
                     "prompt_hash": prompts.hash, "method": method.value, **extra}
            (accepted if keep else rejected).write({**records[i], "judge": judge})
            if keep:
                stats.accepted += 1
            else:
                stats.rejected += 1
            if on_progress:
                on_progress(stats)

        try:
            if method is Scoring.logprobs:
                asyncio.run(_judge_by_logprobs(engine, records, messages, params, write, reason_tokens))
            else:
                asyncio.run(_judge_by_reply(engine, records, messages, params, write, stats, on_progress))
        finally:
            accepted.close()
            rejected.close()
        stats.cache_hits = engine.cache_hits
    return stats, accepted_path, rejected_path


Writer = Callable[[int, float | None, str, dict[str, Any]], None]


async def _judge_by_reply(engine: JudgeEngine, records: list[dict[str, Any]], messages: list[list[dict[str, str]]],
                          params: SamplingParams, write: Writer, stats: JudgeStats,
                          on_progress: Callable[[JudgeStats], None] | None) -> None:
    """The judge writes `Score: N` / `Reason: ...`; a backend that continues a prefilled reply starts at "Score: "."""
    prefill = bool(getattr(engine.backend, "continues_assistant_prefix", False))
    if prefill:
        messages = [m + [{"role": "assistant", "content": SCORE_PREFIX}] for m in messages]
    requests = [ChatRequest(key=f"judge:{r.get('id')}", messages=m, params=params) for r, m in zip(records, messages)]

    def store(i: int, completion: Completion | None, failure: str) -> None:
        if completion is None:
            stats.failed += 1
            if on_progress:
                on_progress(stats)
            return
        text = SCORE_PREFIX + completion.text if prefill else completion.text
        verdict = parse_verdict(text)
        reason = verdict.reason if verdict.score is not None else f"judge reply held no score: {_one_line(text)[:120]!r}"
        write(i, verdict.score, reason, {})

    try:
        await engine.run(requests, store)
    finally:
        await engine.backend.aclose()


async def _judge_by_logprobs(engine: JudgeEngine, records: list[dict[str, Any]], messages: list[list[dict[str, str]]],
                             params: SamplingParams, write: Writer, reason_tokens: int) -> None:
    """Score = expectation of the digit distribution after "Score: "; then the model writes its reason for that
    score (prefilled `Score: <rounded>\nReason:`, greedy, `reason_tokens`; 0 = no reason call, half the work)."""
    score_params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=1, seed=0)
    score_requests = [ChatRequest(key=f"judge-score:{r.get('id')}",
                                  messages=m + [{"role": "assistant", "content": SCORE_PREFIX}], params=score_params)
                      for r, m in zip(records, messages)]
    reason_params = replace(params, max_tokens=max(1, reason_tokens))
    verdicts: dict[int, tuple[float | None, dict[str, Any]]] = {}

    def scored(i: int, payload: dict[str, Any]) -> None:
        first, after_one = payload["positions"][0], payload["positions"][1]
        probs, mass = scale_distribution(first, after_one)
        extra = {"scale_mass": round(mass, 4), "p": [round(x, 4) for x in probs]}
        verdicts[i] = (round(expected_score(probs), 2) if mass >= MIN_SCALE_MASS else None, extra)

    try:
        await engine.run_logprobs(score_requests, scored)
        reason_requests, order = [], []
        for i in range(len(records)):
            score, extra = verdicts[i]
            if score is None:
                write(i, None, f"judge put only {extra['scale_mass']:.3f} of its probability on a score 1-10", extra)
                continue
            if reason_tokens == 0:
                write(i, score, "(no reason asked: --reason-tokens 0)", extra)
                continue
            prefix = f"{SCORE_PREFIX}{int(score + 0.5)}\nReason:"
            reason_requests.append(ChatRequest(key=f"judge:{records[i].get('id')}",
                                               messages=messages[i] + [{"role": "assistant", "content": prefix}],
                                               params=reason_params))
            order.append(i)

        def reasoned(j: int, completion: Completion | None, failure: str) -> None:
            i = order[j]
            score, extra = verdicts[i]
            text = completion.text if completion is not None else ""
            line = next((line for line in text.splitlines() if line.strip(" .:-*")), "")
            reason = _reason(line) or (f"(no reason: {failure})" if failure else "(no reason given)")
            write(i, score, reason, extra)

        await engine.run(reason_requests, reasoned)
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
              concurrency: int | None = None, max_tokens: int = 96, prompts_dir: Path | None = None,
              scoring: Scoring = Scoring.auto, reason_tokens: int = REASON_TOKENS) -> str:
    """`datagen judge`: judge a file and return the summary line to print."""
    if not SCORE_MIN <= min_score <= SCORE_MAX:
        raise VisinstructError(f"--min-score {min_score} is outside the judge's scale", "pass a score from 1 to 10")
    engine = JudgeEngine(backend, cache_path, concurrency or backend.preferred_concurrency)
    # Greedy, so a verdict is a function of the sample and the prompt (and the cache key stays stable).
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    stats, accepted, rejected = judge_file(source, engine, load_judge_prompts(prompts_dir),
                                           coco_context_lookup(coco_root, coco_split), min_score, params, out_dir,
                                           scoring=scoring, reason_tokens=reason_tokens)
    mean = f"{sum(stats.scores) / len(stats.scores):.2f}" if stats.scores else "n/a"
    return (f"judged {stats.accepted + stats.rejected} samples ({stats.skipped} already done, {stats.cache_hits} from cache): "
            f"{stats.accepted} accepted -> {accepted}, {stats.rejected} rejected -> {rejected} "
            f"({stats.unparsed} without a score); mean score {mean}; {stats.failed} failed (rerun to retry)")
