"""Batched generation for the local model that computes each prompt head's KV cache once.

Every prompt of a split opens with the same system message and few-shot examples (the head); only the
image's own message (the tail) differs. `HeadCache` runs the model over a head once and keeps its keys
and values; `generate_rows` lays a batch out as

    [left pad][head of row i][middle pad][tail of row i] -> generated tokens

with the cached head KV copied into place, so a batch pays the forward pass for the tails only. Rows
may have different heads (splits batched together). Padding is masked, and positions come from the
attention mask (transformers' generate counts them from it), so each token sits at the position it
would have without padding: the output matches a plain batched generate up to float rounding.

Imports torch and transformers: only the local backend imports this module, and only when it is used.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList


@dataclass(frozen=True)
class Row:
    """One prompt to complete: `head` tokens whose KV is shared with other prompts, then its own `tail` tokens."""

    head: tuple[int, ...]
    tail: tuple[int, ...]


class HeadCache:
    """Keys and values of prompt heads, computed once per head and reused by every prompt that opens with it.

    Least recently used heads are dropped past `capacity` (one head per split and prompt set in practice; a
    135M model's head of 800 tokens holds about 40 MB).
    """

    def __init__(self, lm, capacity: int = 8) -> None:
        self.lm = lm
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.computed = 0  # heads run through the model so far (tests and the benchmark read it)

    def get(self, head: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the head's (keys, values), each shaped (1, kv_heads, len(head), head_dim)."""
        kv = self.entries.get(head)
        if kv is not None:
            self.entries.move_to_end(head)
            return kv
        with torch.inference_mode():
            out = self.lm(input_ids=torch.tensor([head]), use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.entries[head] = kv
        self.computed += 1
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return kv


class NoRepeatNGramInCompletion(LogitsProcessor):
    """Bans a token that would repeat an n-gram already in the completion (the prompt is not counted: a writer
    may reuse the context's phrases, not its own)."""

    def __init__(self, size: int, prompt_len: int) -> None:
        self.size = size
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = self.size
        generated = input_ids[:, self.prompt_len:].tolist()
        for row, tokens in enumerate(generated):
            if len(tokens) < n:
                continue
            prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
            banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores


def _split_evenly(row: Row) -> Row:
    """At least one token on each side: the tail's last token gives the next-token logits, and a head token keeps
    every padded query of the batch from attending to nothing (an all-masked attention row is NaN)."""
    tokens = row.head + row.tail
    if len(tokens) < 2:
        raise ValueError("a prompt needs at least two tokens")
    if not row.tail:
        return Row(row.head[:-1], row.head[-1:])
    if not row.head:
        return Row(row.tail[:1], row.tail[1:])
    return row


def generate_rows(lm, rows: Sequence[Row], heads: HeadCache, *, max_new_tokens: int, pad_id: int,
                  eos_ids: Sequence[int], temperature: float = 0.0, top_p: float = 1.0,
                  repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, seed: int = 0) -> list[list[int]]:
    """The generated token ids of each row (up to and including an end token, or `max_new_tokens` of them)."""
    rows = [_split_evenly(row) for row in rows]
    width_head = max(len(row.head) for row in rows)
    width_tail = max(len(row.tail) for row in rows)
    count = len(rows)
    cached = [heads.get(row.head) for row in rows]
    layers = []
    for layer in range(len(cached[0])):
        keys0, values0 = cached[0][layer]
        keys = keys0.new_zeros((count, keys0.shape[1], width_head, keys0.shape[3]))
        values = values0.new_zeros((count, values0.shape[1], width_head, values0.shape[3]))
        for i, row in enumerate(rows):
            start = width_head - len(row.head)
            keys[i, :, start:] = cached[i][layer][0][0]
            values[i, :, start:] = cached[i][layer][1][0]
        layers.append((keys, values))
    cache = DynamicCache(ddp_cache_data=layers)
    input_ids = torch.full((count, width_head + width_tail), pad_id, dtype=torch.long)
    mask = torch.zeros((count, width_head + width_tail), dtype=torch.long)
    for i, row in enumerate(rows):
        head_start, tail_start = width_head - len(row.head), width_head + width_tail - len(row.tail)
        input_ids[i, head_start:width_head] = torch.tensor(row.head)
        input_ids[i, tail_start:] = torch.tensor(row.tail)
        mask[i, head_start:width_head] = 1
        mask[i, tail_start:] = 1
    processors = LogitsProcessorList()
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramInCompletion(no_repeat_ngram_size, input_ids.shape[1]))
    sample = temperature > 0
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = lm.generate(
            input_ids=input_ids, attention_mask=mask, cache=cache, max_new_tokens=max_new_tokens,
            do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
            logits_processor=processors, pad_token_id=pad_id, eos_token_id=list(eos_ids),
        )
    return [generated.tolist() for generated in out[:, input_ids.shape[1]:]]
