"""The response cache: keyed by everything that shapes a completion, so reruns cost nothing."""
from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.backends.openai_backend import OpenAIBackend, chat_body
from datagen.engine.cache import CacheKeys, ResponseCache, cache_key
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


def test_connections_opening_one_new_cache_together_all_open(tmp_path):
    """Splits side by side open the same new cache from their own threads at once: SQLite's immediate "database
    is locked" on switching to WAL or creating the table is waited out, never a failed run (it was in CI)."""
    for trial in range(40):
        path = tmp_path / f"c{trial}.sqlite"
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def open_and_write(i: int) -> None:
            start.wait()
            try:
                cache = ResponseCache(path)
                cache.put_many([(f"k{i}", "openai", "m", f"item{i}", Completion(str(i), "stop", 1, 1, "m"))])
                cache.close()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        cache = ResponseCache(path)
        assert [cache.get(f"k{i}").text for i in range(4)] == ["0", "1", "2", "3"]
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


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_VALUE = st.one_of(_TEXT, st.integers(-3, 3), st.booleans(), st.floats(allow_nan=False, width=32), st.none(),
                   st.lists(st.dictionaries(_TEXT, _TEXT, max_size=2), max_size=2))  # a list: content parts
_MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "name", "x"]), _VALUE, max_size=3)
_PARAMS = st.builds(SamplingParams, temperature=st.floats(0, 2), top_p=st.floats(0, 1), max_tokens=st.integers(1, 9),
                    seed=st.integers(-2, 2), repetition_penalty=st.sampled_from([1.0, 1.1]))


@settings(max_examples=60, deadline=None)
@given(heads=st.lists(st.lists(_MESSAGE, max_size=4), min_size=1, max_size=3),
       lasts=st.lists(_MESSAGE, min_size=1, max_size=6), params=st.lists(_PARAMS, min_size=1, max_size=2),
       backend=_TEXT, model=_TEXT)
def test_remembered_prompt_heads_give_the_exact_keys_and_bodies(heads, lasts, params, backend, model):
    """CacheKeys and the backend's body encoder, which encode a shared prompt head once, give exactly cache_key's
    digest and json.dumps(chat_body(...)), request after request (heads repeated, mixed, and empty)."""
    keys = CacheKeys(backend, model)
    backend_client = OpenAIBackend(model or "m", base_url="http://127.0.0.1:9/v1", api_key="k")
    for n, last in enumerate(lasts):
        messages = [*heads[n % len(heads)], last] if n % 5 != 4 else []
        request = ChatRequest(f"{n}:x", messages, params[n % len(params)])
        assert keys.key(request) == cache_key(backend, model, request)
        assert backend_client.encode_body(request) == json.dumps(chat_body(model or "m", request)).encode()
    # 1, 1.0 and True are equal as dict values but not as JSON: the memo must not mix them up.
    for value in (1, 1.0, True):
        request = ChatRequest("v", [{"role": "system", "content": value}, {"role": "user", "content": "u"}])
        assert keys.key(request) == cache_key(backend, model, request)
        assert backend_client.encode_body(request) == json.dumps(chat_body(model or "m", request)).encode()


def _completion(text: str, alternatives: int) -> Completion:
    first = Completion(text, "stop", 3, 1, "m")
    return replace(first, alternatives=tuple(Completion(f"{text} #{i}", "length", 3, 2, "m") for i in range(alternatives)))


@settings(max_examples=60, deadline=None)
@given(stored=st.dictionaries(st.text("0af", min_size=1, max_size=4), st.integers(0, 2), max_size=12),
       asked=st.lists(st.text("0af", min_size=1, max_size=4), max_size=20))
def test_get_many_is_get_per_key_that_has_a_completion(tmp_path_factory, stored, asked):
    """`get_many` answers as `get` asked key by key (alternatives included; keys are hex digests, and short ones
    prefix each other here), only for keys that have a completion; queries are split so any number can be asked."""
    import datagen.engine.cache as cache_module

    cache = ResponseCache(tmp_path_factory.mktemp("c") / "c.sqlite")
    try:
        cache.put_many([(key, "openai", "m", key, _completion(key, n)) for key, n in stored.items()])
        expected = {key: cache.get(key) for key in asked if cache.get(key) is not None}
        assert cache.get_many(asked) == expected
        original = cache_module.KEYS_PER_QUERY
        cache_module.KEYS_PER_QUERY = 3
        try:
            assert cache.get_many(asked) == expected
        finally:
            cache_module.KEYS_PER_QUERY = original
    finally:
        cache.close()
