"""LLaVA-format data: reading, chat-template masking from the tokenizer, collation, length grouping."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from datagen.errors import VisinstructError
from datagen.hf_dataset import image_cache_dir, is_hf_input
from datagen.sample import read_samples
from model.errors import TrainError
from model.llava import IGNORE

log = logging.getLogger(__name__)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read LLaVA-format samples (JSON arrays, JSONL, HF dataset folders, hf://org/name) through datagen's one reader."""
    records: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not is_hf_input(path) and not path.exists():  # hf://org/name and exported folders read as datasets
            raise TrainError(f"data file '{path}' does not exist", "run `make data` / `datagen captions`, or fix the path")
        try:
            # An HF dataset's embedded images are written once to a cache folder, and the samples name those files.
            items = list(read_samples(path, extract_images_to=image_cache_dir()))
        except VisinstructError as exc:
            raise TrainError(exc.what, exc.hint or "fix or regenerate the file") from None
        for i, item in enumerate(items):
            if not isinstance(item.get("conversations"), list):  # a generation reject that never parsed
                raise TrainError(f"{path} item {i} has no 'conversations' list", "use LLaVA's sample format")
            records.append(item)
    return records


def to_messages(record: dict[str, Any], image_token: str) -> list[dict[str, str]]:
    """Convert LLaVA turns to chat messages, validating roles and the `<image>` placeholder.

    A sample with an "image" needs exactly one `<image>`, in its first user turn; a sample without one
    (LLaVA-1.5's text-only ShareGPT part) needs none.
    """
    sid = record.get("id", "?")
    messages = []
    for turn in record["conversations"]:
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None or not isinstance(turn.get("value"), str):
            raise TrainError(f"sample {sid}: bad turn {turn!r}", "turns need from in human/gpt/system and a string value")
        # LLaVA data puts '<image>\n' before or after the question; strip outer whitespace so templates agree.
        messages.append({"role": role, "content": turn["value"].strip()})
    n_images = sum(m["content"].count(image_token) for m in messages)
    if not record.get("image"):
        if n_images:
            raise TrainError(f"sample {sid} has '{image_token}' but no 'image' field", "add the image file name")
    elif n_images != 1 or image_token not in next((m["content"] for m in messages if m["role"] == "user"), ""):
        raise TrainError(
            f"sample {sid} has {n_images} '{image_token}' placeholders (needs exactly one, in the first user turn)",
            "fix the data: an image sample is one image plus a conversation about it",
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainError(f"sample {sid} has no gpt turn", "every sample needs at least one answer")
    return messages


class ConversationEncoder:
    """Tokenize with the LLM's chat template; labels only on assistant answers and their end-of-turn token.

    Answer spans come from templating the conversation incrementally: the text up to the generation
    prompt before an answer must be a prefix of the text that includes it, so the answer's character
    span is exact; token labels then follow from the tokenizer's offset mapping.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.is_fast:
            raise TrainError("the tokenizer is not a fast tokenizer", "offset mapping needs a tokenizers-backed tokenizer")
        if not tokenizer.chat_template:
            raise TrainError("the tokenizer has no chat template", "use a chat/instruct LLM or set a template")
        self.tokenizer = tokenizer
        # Longest first so '<|im_end|>' wins over any shorter special token sharing a prefix.
        self._specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def answer_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Return the full templated text and the character spans to train on."""
        full = self._render(messages, False)
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            after = self._render(messages[: i + 1], False)
            if not (after.startswith(before) and full.startswith(after)):
                raise TrainError(
                    "the chat template is not incremental (a conversation prefix renders differently)",
                    "use a template whose rendering of earlier turns does not depend on later ones",
                )
            segment = after[len(before):]
            pos = segment.find(msg["content"])
            if pos < 0:
                raise TrainError("the chat template rewrites assistant content", "use a template that keeps answers verbatim")
            start = len(before) + pos
            end = start + len(msg["content"])
            rest = after[end:]
            stripped = rest.lstrip(" ")
            eot = next((s for s in self._specials if stripped.startswith(s)), None)
            if eot is not None:
                end += len(rest) - len(stripped) + len(eot)
            spans.append((start, end))
        return full, spans

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE outside answer spans)."""
        full, spans = self.answer_spans(messages)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        labels = [IGNORE] * len(ids)
        for k, (s, e) in enumerate(enc["offset_mapping"]):
            for a, b in spans:
                # Tokens inside the span train; a token straddling its edge trains if it carries answer
                # characters (e.g. ' The' after 'ASSISTANT:'), not if it is only template whitespace.
                if (a <= s and e <= b and e > s) or (s < b and e > a and full[max(s, a) : min(e, b)].strip()):
                    labels[k] = ids[k]
                    break
        return ids, labels


@dataclass
class Sample:
    """One prepared sample: compact ids (one `<image>`, or none if text-only), labels, image path, expanded length."""

    ids: list[int]
    labels: list[int]
    image: Path | None
    length: int


@dataclass
class DataReport:
    """What happened to every record: kept, or why it was left out."""

    total: int = 0
    kept: int = 0
    no_labels: int = 0
    labels_truncated_away: int = 0
    image_past_max_length: int = 0
    truncated: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (at most 20 dropped ids listed)."""
        d = dict(self.__dict__)
        d["dropped_ids"] = self.dropped_ids[:20]
        return d


def prepare(
    records: Iterable[dict[str, Any]],
    encoder: ConversationEncoder,
    image_folder: str | Path,
    image_token_id: int,
    image_token: str,
    num_image_tokens: int,
    max_length: int,
) -> tuple[list[Sample], DataReport]:
    """Encode records, check images exist, truncate without cutting the image block, and count drops."""
    folder = Path(image_folder)
    report = DataReport()
    samples: list[Sample] = []
    missing: list[str] = []
    for rec in records:
        report.total += 1
        sid = str(rec.get("id", report.total - 1))
        messages = to_messages(rec, image_token)
        path = folder / str(rec["image"]) if rec.get("image") else None
        if path is not None and not path.is_file():
            missing.append(str(path))
            continue
        ids, labels = encoder.encode(messages)
        if ids.count(image_token_id) != (1 if path else 0):
            raise TrainError(f"sample {sid}: '{image_token}' did not tokenize to one token", "check the tokenizer setup")
        pos = ids.index(image_token_id) if path else len(ids)
        extra = num_image_tokens - 1 if path else 0
        if not any(lab != IGNORE for lab in labels):
            report.no_labels += 1
            report.dropped_ids.append(sid)
            continue
        if path is not None and pos + num_image_tokens > max_length:
            report.image_past_max_length += 1
            report.dropped_ids.append(sid)
            continue
        if len(ids) + extra > max_length:
            keep = max_length - extra
            ids, labels = ids[:keep], labels[:keep]
            if not any(lab != IGNORE for lab in labels):
                report.labels_truncated_away += 1
                report.dropped_ids.append(sid)
                continue
            report.truncated += 1
        if path is not None:
            labels[pos] = IGNORE
        samples.append(Sample(ids, labels, path, len(ids) + extra))
    if missing:
        raise TrainError(
            f"{len(missing)} image file(s) not found, first: {missing[0]}",
            "check data.image_folder (stage image folder) and the samples' 'image' names",
        )
    report.kept = len(samples)
    assert all(any(lab != IGNORE for lab in s.labels) for s in samples), "kept a sample without labels"
    if report.kept == 0:
        raise TrainError("no usable samples after masking/truncation", "raise max_length or check the data")
    return samples, report


class Collator:
    """Expand each `<image>` to the tower's patch count, pad, and preprocess images."""

    def __init__(self, image_processor: Any, image_token_id: int, num_image_tokens: int, pad_id: int) -> None:
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.pad_id = pad_id

    def expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Replace the single image token by num_image_tokens copies (labels IGNORE); text-only rows pass."""
        if self.image_token_id not in ids:
            return ids, labels
        pos = ids.index(self.image_token_id)
        n = self.num_image_tokens
        return ids[:pos] + [self.image_token_id] * n + ids[pos + 1 :], labels[:pos] + [IGNORE] * n + labels[pos + 1 :]

    def __call__(self, batch: list[Sample]) -> dict[str, torch.Tensor]:
        rows = [self.expand(s.ids, s.labels) for s in batch]
        width = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labs) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(labs)] = torch.tensor(labs)
            attention[i, : len(ids)] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
        # Pixel rows follow the image samples' batch order, which is the order the splice fills them in.
        images = [load_image(s.image) for s in batch if s.image is not None]
        if images:
            out["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return out


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB with a clear error."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read image {path} ({exc})", "replace or remove the broken file") from exc


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: bool = True, mega: int = 16
) -> list[list[int]]:
    """Deterministic batches for (seed, epoch): shuffle, sort by length inside megabatches, shuffle batches.

    Grouping similar lengths cuts padding; the megabatch keeps order random enough for SGD.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group:
        size = batch_size * mega
        order = [i for k in range(0, len(order), size) for i in sorted(order[k : k + size], key=lambda j: -lengths[j])]
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if group:
        rng.shuffle(batches)
    return batches


class MicroBatches:
    """This rank's micro-batch index lists, numbered globally from `first` to `last` (a DataLoader batch_sampler).

    Micro-batch k is a pure function of (seed, k), so a resumed run starts at k = step x accumulation and
    sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: bool, world: int, rank: int,
                 per_epoch: int, first: int, last: int) -> None:
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group
        self.world, self.rank, self.per_epoch, self.first, self.last = world, rank, per_epoch, first, last

    def __len__(self) -> int:
        return self.last - self.first

    def __iter__(self) -> Iterator[list[int]]:
        epoch_batches: dict[int, list[list[int]]] = {}
        for k in range(self.first, self.last):
            epoch, j = divmod(k, self.per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch, self.group)}
            yield epoch_batches[epoch][j * self.world + self.rank]
