"""The `vllm` backend of the Ray executor: vLLM engines on GPU workers through `ray.data.llm`.

UNTESTED: vLLM needs GPUs and the optional extra (`pip install -e '.[vllm]'`), neither of which the
project's CI has. Kept thin on purpose: the driver plans and records exactly as for the other backends
(datagen.executors.ray_executor); only the LLM stage differs. ray.data.llm applies the model's chat
template, batches continuously on each engine, and returns `generated_text` and token counts.
"""
from __future__ import annotations

import pickle
from typing import Any

from datagen.backends.base import Completion
from datagen.engine.work import Completed, WorkItem
from datagen.executors.ray_items import ChunkResult, Judged

VLLM_BATCH_SIZE = 64  # rows per engine call; ray.data.llm keeps several in flight per engine


def item_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunk rows -> one row per uncached item (messages, sampling params, the pickled item), and cached ones."""
    out = []
    for row in rows:
        for item in pickle.loads(row["items"]):
            p = item.request.params
            out.append({"item": pickle.dumps(item), "cached": item.cached is not None,
                        "messages": item.request.messages,
                        "sampling_params": {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens,
                                            "seed": p.seed, "repetition_penalty": p.repetition_penalty}})
    return out


def judge_batch(batch: dict[str, Any], task: Any, model: str) -> dict[str, Any]:
    """Completions (from vLLM, or cached) -> judged results, as the openai stage returns them."""
    results = []
    for n, blob in enumerate(batch["item"]):
        item: WorkItem = pickle.loads(blob)
        if item.cached is not None:
            completion, fresh = item.cached, False
        else:
            done = int(batch["completion_tokens"][n])
            completion = Completion(text=str(batch["text"][n]),
                                    finish_reason="length" if done >= item.request.params.max_tokens else "stop",
                                    prompt_tokens=int(batch["prompt_tokens"][n]), completion_tokens=done, model=model)
            fresh = True
        # The request rides back too: the driver's recorder stores fresh completions in the cache under its key.
        judged = Judged(item.item_id, task.judge(item.prepared, completion), item.request)
        results.append(Completed(WorkItem(item.seq, judged, item.key), completion, fresh))
    return {"result": [pickle.dumps(ChunkResult(results))]}


def vllm_dataset(rows: list[dict[str, Any]], task: Any, spec: Any, engines: int):
    """The dataset of judged results: uncached items through vLLM engines (one per GPU), cached ones straight on."""
    import ray.data  # the [ray] extra: imported by --executor ray only
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # needs the [vllm] extra

    items = item_rows(rows)
    judge = {"fn_kwargs": {"task": task, "model": spec.model}, "batch_size": VLLM_BATCH_SIZE}
    cached = [row for row in items if row["cached"]]
    pending = [row for row in items if not row["cached"]]
    parts = []
    if cached:
        parts.append(ray.data.from_items([{"item": r["item"]} for r in cached]).map_batches(judge_batch, **judge))
    if pending:
        processor = build_processor(
            vLLMEngineProcessorConfig(model_source=spec.model, concurrency=engines, batch_size=VLLM_BATCH_SIZE),
            preprocess=lambda row: {"item": row["item"], "messages": row["messages"],
                                    "sampling_params": row["sampling_params"]},
            postprocess=lambda row: {"item": row["item"], "text": row["generated_text"],
                                     "prompt_tokens": row["num_input_tokens"],
                                     "completion_tokens": row["num_generated_tokens"]},
        )
        parts.append(processor(ray.data.from_items(pending)).map_batches(judge_batch, **judge))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
