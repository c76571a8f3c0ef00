"""Batched generation for the local model that computes each prompt head's KV cache once.

Every prompt of a split opens with the same system message and few-shot examples (the head); only the
image's own message (the tail) differs. `HeadCache` runs the model over a head once and keeps its keys
and values. `generate_rows` then runs each *distinct* prompt's tail alone on top of its cached head (no
padding computed, and the N candidates of one prompt share one prefill), and lays the batch out as

    [left pad][head of row i][middle pad][tail of row i] -> generated tokens

in a key/value buffer allocated once for the whole run (`PreallocatedLayer`: no per-step concatenation
of the cache). Padding is masked, and positions come from the attention mask, so each token sits at the
position it would have without padding: greedy output matches transformers' generate on each prompt
alone. The decoding loop is our own so that a row leaves the batch when it ends: later steps cost only
the rows still writing (a batch used to run every row to the length of its longest answer).

Imports torch and transformers: only the local backend imports this module, and only when it is used.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (DynamicCache, LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopPLogitsWarper)
from transformers.cache_utils import Cache, DynamicLayer


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
            cache = DynamicCache()
            self.lm(input_ids=torch.tensor([head]), cache=cache, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
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


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers sized for the whole generation: a step writes its token in place
    and attention reads a view of the filled part (the default cache concatenates, copying the whole cache of
    every layer at every step). Grows by doubling if a caller writes past the planned size."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.is_initialized = True
        self.device = keys.device
        self._keys, self._values, self.length = keys, values, length
        self._views()

    def _views(self) -> None:
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            shape = (*self._keys.shape[:2], 2 * end, self._keys.shape[-1])
            keys, values = self._keys.new_empty(shape), self._values.new_empty(shape)
            keys[:, :, :self.length] = self.keys
            values[:, :, :self.length] = self.values
            self._keys, self._values = keys, values
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()

    def get_seq_length(self) -> int:
        return self.length


def prefill(lm, row: Row, head_kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """The next-token logits after `row`, and per layer the (keys, values) of its tail: the tail alone through the
    model on top of its cached head (one prompt, so nothing is padded)."""
    cache = DynamicCache(ddp_cache_data=head_kv)
    length = len(row.head) + len(row.tail)
    logits = lm(input_ids=torch.tensor([row.tail]), attention_mask=torch.ones((1, length), dtype=torch.long),
                position_ids=torch.arange(len(row.head), length)[None], cache=cache, use_cache=True,
                logits_to_keep=1).logits[0, -1, :]
    return logits, [(layer.keys[0, :, len(row.head):], layer.values[0, :, len(row.head):]) for layer in cache.layers]


def generate_rows(lm, rows: Sequence[Row], heads: HeadCache, *, max_new_tokens: int, pad_id: int,
                  eos_ids: Sequence[int], temperature: float = 0.0, top_p: float = 1.0,
                  repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, seed: int = 0,
                  min_new_tokens: int = 0) -> list[list[int]]:
    """The generated token ids of each row (up to and including an end token, or `max_new_tokens` of them).

    Equal rows (the N candidates of one prompt) share one prefill; each then samples its own tokens."""
    rows = [_split_evenly(row) for row in rows]
    width_head = max(len(row.head) for row in rows)
    width_tail = max(len(row.tail) for row in rows)
    width = width_head + width_tail
    count = len(rows)
    with torch.inference_mode():
        distinct: dict[Row, tuple] = {}
        for row in rows:
            if row not in distinct:
                head_kv = heads.get(row.head)
                distinct[row] = (head_kv, *prefill(lm, row, head_kv))
        layers = []
        for layer in range(len(distinct[rows[0]][0])):
            keys0 = distinct[rows[0]][0][layer][0]
            shape = (count, keys0.shape[1], width + max_new_tokens, keys0.shape[3])
            keys, values = keys0.new_empty(shape), keys0.new_empty(shape)
            keys[:, :, :width] = 0  # padding is masked, but must not be NaN: a masked 0 weight times NaN is NaN
            values[:, :, :width] = 0
            for i, row in enumerate(rows):
                head_kv, _, tail_kv = distinct[row]
                head_start, tail_start = width_head - len(row.head), width - len(row.tail)
                keys[i, :, head_start:width_head] = head_kv[layer][0][0]
                values[i, :, head_start:width_head] = head_kv[layer][1][0]
                keys[i, :, tail_start:width] = tail_kv[layer][0]
                values[i, :, tail_start:width] = tail_kv[layer][1]
            layers.append(PreallocatedLayer(keys, values, width))
        logits = torch.stack([distinct[row][1] for row in rows])
    cache = Cache(layers=layers)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    mask = torch.zeros((count, width), dtype=torch.long)
    for i, row in enumerate(rows):
        head_start, tail_start = width_head - len(row.head), width - len(row.tail)
        input_ids[i, head_start:width_head] = torch.tensor(row.head)
        input_ids[i, tail_start:] = torch.tensor(row.tail)
        mask[i, head_start:width_head] = 1
        mask[i, tail_start:] = 1
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramInCompletion(no_repeat_ngram_size, input_ids.shape[1]))
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    generator = torch.Generator().manual_seed(seed)
    eos = torch.tensor(list(eos_ids), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each token where it would sit without padding
    results: list[list[int]] = [[] for _ in rows]
    active = list(range(count))  # rows still generating, in the order of the batch's remaining rows
    with torch.inference_mode():
        sequence, last = input_ids, positions[:, -1]
        for step in range(max_new_tokens):
            # Penalties see each row's real tokens only (a pad stands in for the row's last token, already counted).
            seen = torch.where(mask.bool(), sequence, sequence[:, -1:])
            scores = processors(seen, logits.float())
            if step < min_new_tokens:
                scores[:, eos] = -float("inf")
            if temperature > 0:
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                chosen = scores.argmax(dim=-1)
            for row, token in zip(active, chosen.tolist()):
                results[row].append(token)
            if step == max_new_tokens - 1:
                break
            sequence = torch.cat([sequence, chosen[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            last = last + 1
            finished = torch.isin(chosen, eos)
            if finished.any():
                # Finished rows leave the batch: the steps that remain cost only the rows still writing.
                keep = (~finished).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                active = [active[k] for k in keep.tolist()]
                cache.batch_select_indices(keep)
                sequence, mask, last, chosen = sequence[keep], mask[keep], last[keep], chosen[keep]
            logits = lm(input_ids=chosen[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache,
                        use_cache=True).logits[:, -1, :]
    return results
