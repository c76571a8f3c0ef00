"""The response cache: keyed by everything that shapes a completion, so reruns cost nothing."""
from __future__ import annotations

import shutil
from dataclasses import replace

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.engine.cache import ResponseCache, cache_key
from datagen.sample import OutputLayout
from engine_support import REPO, datagen_here, ids_of, run_engine
from fake_openai_server import FakeOpenAIServer

MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def test_cache_key_covers_backend_model_messages_sampling_and_seed():
    base = ChatRequest("1:detail", MESSAGES, SamplingParams())
    key = cache_key("openai", "m", base)
    assert key == cache_key("openai", "m", ChatRequest("other-key", MESSAGES, SamplingParams()))  # the item label is not content
    variants = [
        cache_key("local", "m", base),
        cache_key("openai", "m2", base),
        cache_key("openai", "m", replace(base, messages=[MESSAGES[0], {"role": "user", "content": "u!"}])),
        cache_key("openai", "m", replace(base, params=SamplingParams(temperature=0.1))),
        cache_key("openai", "m", replace(base, params=SamplingParams(max_tokens=7))),
        cache_key("openai", "m", replace(base, params=SamplingParams(seed=1))),
    ]
    assert len({key, *variants}) == 7


def test_cache_round_trip_and_clear(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    completion = Completion("hi", "stop", 3, 1, "m-2024")
    cache.put_many([("k1", "openai", "m", "1:detail", completion), ("k2", "openai", "n", "2:detail", completion)])
    assert cache.get("k1") == completion and cache.get("nope") is None
    stats = cache.stats()
    assert stats.entries == 2 and stats.prompt_tokens == 6 and stats.by_model == {"openai:m": 1, "openai:n": 1}
    assert cache.clear("m") == 1 and cache.get("k1") is None and cache.get("k2") == completion
    cache.close()


def test_rerun_with_same_inputs_makes_zero_requests(coco_root, tmp_path):
    cache = tmp_path / "cache.sqlite"
    with FakeOpenAIServer() as server:
        first = run_engine(server.base_url, tmp_path / "a.jsonl", coco_root, limit=12, cache_path=cache)
        assert server.state.count == 12
        # A different output file: nothing is "done" there, yet every completion comes from the cache.
        second = run_engine(server.base_url, tmp_path / "b.jsonl", coco_root, limit=12, cache_path=cache)
        assert server.state.count == 12
    assert second.cache_hits == 12 and second.requests == 0 and second.prompt_tokens == 0 and second.cost_usd == 0
    assert sorted(ids_of(tmp_path / "a.jsonl", OutputLayout(tmp_path / "a.jsonl").rejects)) == \
        sorted(ids_of(tmp_path / "b.jsonl", OutputLayout(tmp_path / "b.jsonl").rejects))
    assert first.requests == 12


def test_editing_one_prompt_file_regenerates_only_that_split(coco_root, tmp_path):
    prompts = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", prompts)
    cache = tmp_path / "cache.sqlite"
    with FakeOpenAIServer() as server:
        for split in ("conversation", "reasoning"):
            run_engine(server.base_url, tmp_path / f"{split}-1.jsonl", coco_root, split=split, limit=6,
                       prompts_dir=prompts, cache_path=cache)
        assert server.state.count == 12
        system = prompts / "conversation" / "system.md"
        system.write_text(system.read_text() + "\nKeep every answer under three sentences.\n")
        conv = run_engine(server.base_url, tmp_path / "conversation-2.jsonl", coco_root, split="conversation", limit=6,
                          prompts_dir=prompts, cache_path=cache)
        reas = run_engine(server.base_url, tmp_path / "reasoning-2.jsonl", coco_root, split="reasoning", limit=6,
                          prompts_dir=prompts, cache_path=cache)
        assert server.state.count == 18
    assert conv.requests == 6 and conv.cache_hits == 0
    assert reas.requests == 0 and reas.cache_hits == 6


def test_no_cache_flag_and_cache_commands(coco_root, tmp_path):
    with FakeOpenAIServer() as server:
        common = ("generate", "--split", "reasoning", "--coco-root", str(coco_root), "--limit", "3", "--backend", "openai",
                  "--base-url", server.base_url)
        for name in ("a", "b"):
            proc = datagen_here(*common, "--no-cache", "--out", str(tmp_path / f"{name}.jsonl"))
            assert proc.returncode == 0, proc.stderr
        assert server.state.count == 6 and not (tmp_path / ".cache").exists()
        proc = datagen_here(*common, "--out", str(tmp_path / "c.jsonl"))
        assert proc.returncode == 0, proc.stderr
    cache = tmp_path / ".cache" / "responses.sqlite"
    stats = datagen_here("cache", "stats", "--cache", str(cache))
    assert stats.returncode == 0 and "3 responses" in stats.stdout and "openai:gpt-4o-mini: 3" in stats.stdout
    cleared = datagen_here("cache", "clear", "--cache", str(cache))
    assert cleared.returncode == 0 and "removed 3" in cleared.stdout
    assert "0 responses" in datagen_here("cache", "stats", "--cache", str(cache)).stdout
