"""The local backend's micro-batching runs through the same engine path as the HTTP backend."""
from __future__ import annotations

import asyncio

from datagen.backends.base import Completion, SamplingParams
from datagen.backends.local import LocalBackend
from datagen.engine.config import EngineConfig
from datagen.executors.local import run_local
from datagen.sample import OutputLayout
from datagen.task import LlavaTask
from datagen.prompts import load_prompt_set
from engine_support import ids_of, load_index
from fake_openai_server import completion_text


def batching_backend(batch_size: int) -> tuple[LocalBackend, list[int]]:
    """A LocalBackend whose generate_batch answers without a model, recording the batch sizes it was given."""
    backend = LocalBackend.__new__(LocalBackend)  # skip loading weights; the batching loop is what is under test
    backend.model, backend.batch_size, backend.preferred_concurrency, backend.max_wait_s = "fake-local", batch_size, batch_size, 0.05
    backend._queue, backend._worker = None, None
    sizes: list[int] = []

    def generate_batch(conversations, params):
        sizes.append(len(conversations))
        return [Completion(completion_text(c[-1]["content"]), "stop", 10, 20, "fake-local") for c in conversations]

    backend.generate_batch = generate_batch
    return backend, sizes


def test_engine_feeds_full_batches_and_caches_local_completions(coco_root, tmp_path):
    index = load_index(coco_root, "conversation")
    ids = index.image_ids()[:24]
    cache = tmp_path / "cache.sqlite"

    def run(out):
        backend, sizes = batching_backend(8)
        task = LlavaTask("conversation", load_prompt_set(None, "conversation"), SamplingParams(),
                         provenance={"backend": backend.name}, gate=False)

        async def go():
            try:
                return await run_local(task, OutputLayout(out), backend, index.records(ids), EngineConfig(cache_path=cache),
                                       backend.preferred_concurrency)
            finally:
                await backend.aclose()

        return asyncio.run(go()), sizes

    stats, sizes = run(tmp_path / "a.jsonl")
    assert sum(sizes) == 24 and max(sizes) == 8 and len(sizes) <= 6  # concurrency keeps the batches (nearly) full
    assert stats.cost_usd == 0 and stats.requests == 24
    assert sorted(ids_of(tmp_path / "a.jsonl", OutputLayout(tmp_path / "a.jsonl").rejects)) == [f"{i:012d}" for i in sorted(ids)]
    again, sizes = run(tmp_path / "b.jsonl")
    assert sizes == [] and again.cache_hits == 24
