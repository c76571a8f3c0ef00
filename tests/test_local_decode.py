"""The local model's batched generation with shared prompt heads gives what a plain, unbatched generate gives."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from datagen.backends.local_decode import HeadCache, Row, generate_rows

VOCAB, PAD, EOS = 61, 0, 1


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def plain_greedy(lm, tokens: tuple[int, ...], steps: int) -> list[int]:
    ids = torch.tensor([tokens])
    with torch.inference_mode():
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                          pad_token_id=PAD, eos_token_id=[EOS])
    return out[0, ids.shape[1]:].tolist()


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


token = st.integers(2, VOCAB - 1)
heads = st.lists(st.tuples(token, token).map(list).flatmap(lambda t: st.lists(token, min_size=0, max_size=25).map(
    lambda rest: tuple(t + rest))), min_size=1, max_size=3)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head_set=heads, data=st.data())
def test_shared_heads_change_nothing_in_greedy_output(tiny_lm, head_set, data):
    """Rows of different heads and tail lengths in one batch: each row's greedy tokens equal its own plain run."""
    rows = data.draw(st.lists(st.builds(Row, st.sampled_from(head_set), st.lists(token, min_size=0, max_size=15).map(tuple)),
                              min_size=1, max_size=5))
    cache = HeadCache(tiny_lm)
    got = generate_rows(tiny_lm, rows, cache, max_new_tokens=6, pad_id=PAD, eos_ids=[EOS])
    for row, tokens in zip(rows, got):
        assert until_eos(tokens) == until_eos(plain_greedy(tiny_lm, row.head + row.tail, 6))
    # Each distinct head (as the batch saw it: at least one token left for the tail) ran through the model once.
    assert cache.computed <= len(set(rows_heads(rows)))
    generate_rows(tiny_lm, rows, cache, max_new_tokens=2, pad_id=PAD, eos_ids=[EOS])
    assert cache.computed <= len(set(rows_heads(rows)))  # the second batch reuses them all


def rows_heads(rows):
    return [row.head if row.tail else row.head[:-1] for row in rows]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(token, min_size=2, max_size=20).map(tuple), size=st.integers(1, 3), seed=st.integers(0, 5))
def test_no_repeat_ngram_holds_within_the_completion(tiny_lm, prompt, size, seed):
    [tokens] = generate_rows(tiny_lm, [Row(prompt[:1], prompt[1:])], HeadCache(tiny_lm), max_new_tokens=24, pad_id=PAD,
                             eos_ids=[EOS], temperature=1.0, top_p=1.0, no_repeat_ngram_size=size, seed=seed)
    tokens = until_eos(tokens)
    grams = [tuple(tokens[i:i + size]) for i in range(len(tokens) - size + 1)]
    assert len(grams) == len(set(grams))


def test_equal_rows_share_one_prefill_and_still_sample_apart(tiny_lm, monkeypatch):
    """The N candidates of one prompt are prefilled once; greedy gives each the plain run's tokens, sampling differs."""
    import datagen.backends.local_decode as decode

    calls = []
    real = decode.prefill

    def counting(lm, row, head_kv):
        calls.append(row)
        return real(lm, row, head_kv)

    monkeypatch.setattr(decode, "prefill", counting)
    a, b = Row((5, 6, 7), (8, 9)), Row((5, 6, 7), (10, 11, 12, 13))
    rows = [a, a, b, a]
    got = generate_rows(tiny_lm, rows, HeadCache(tiny_lm), max_new_tokens=8, pad_id=PAD, eos_ids=[EOS])
    assert len(calls) == 2 and set(calls) == {a, b}
    for row, tokens in zip(rows, got):
        assert until_eos(tokens) == until_eos(plain_greedy(tiny_lm, row.head + row.tail, 8))
    calls.clear()
    sampled = generate_rows(tiny_lm, [a] * 6, HeadCache(tiny_lm), max_new_tokens=12, pad_id=PAD, eos_ids=[-1],
                            temperature=1.5, seed=3)
    assert len(calls) == 1 and len({tuple(t) for t in sampled}) > 1
