"""LLaVA-format data: reading, chat-template masking from the tokenizer, collation, length grouping."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from datagen.errors import VisinstructError
from datagen.hf_dataset import image_cache_dir, is_hf_input
from datagen.sample import ImagePathError, read_samples, resolve_image
from model.errors import TrainError
from model.llava import IGNORE
from train.images import ImageTransform, load_image

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


def resolve_image_path(image_folder: str | Path, rec: dict[str, Any], index: int = 0) -> Path:
    """The file a record's image names inside the image folder (datagen.sample's one path rule).

    Images a dataset embedded are extracted to the image cache and named by absolute path there, so the
    cache is the one other folder allowed. Anything else outside the folder is a TrainError naming the sample.
    """
    try:
        return resolve_image(image_folder, rec.get("image"), trusted=(image_cache_dir(),))
    except ImagePathError as exc:
        sid = str(rec.get("id", index))
        raise TrainError(f"sample {sid}: {exc.what} (image folder {image_folder})", exc.hint) from None


def to_messages(record: dict[str, Any], image_token: str, image_position: str = "first") -> list[dict[str, str]]:
    """Convert LLaVA turns to chat messages, validating roles and the `<image>` placeholder.

    A sample with an "image" needs exactly one `<image>`, in its first user turn; a sample without one
    (LLaVA-1.5's text-only ShareGPT part) needs none. With image_position "first" the placeholder moves to
    the start of that turn as `<image>\n<question>`, as LLaVA's preprocess_multimodal does (about half of
    LLaVA-Instruct has it after the question, a position never seen at inference); "keep" leaves it.
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
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if not record.get("image"):
        if n_images:
            raise TrainError(f"sample {sid} has '{image_token}' but no 'image' field", "add the image file name")
    elif n_images != 1 or first_user is None or image_token not in messages[first_user]["content"]:
        raise TrainError(
            f"sample {sid} has {n_images} '{image_token}' placeholders (needs exactly one, in the first user turn)",
            "fix the data: an image sample is one image plus a conversation about it",
        )
    elif image_position == "first":
        text = messages[first_user]["content"].replace(image_token, "").strip()
        messages[first_user]["content"] = f"{image_token}\n{text}" if text else image_token
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainError(f"sample {sid} has no gpt turn", "every sample needs at least one answer")
    return messages


class ConversationEncoder:
    """Tokenize with the LLM's chat template; labels only on assistant answers and their end-of-turn marker.

    Answer spans come from templating the conversation incrementally: the text up to the generation
    prompt before an answer must be a prefix of the text that includes it, so the answer's character
    span is exact; token labels then follow from the tokenizer's offset mapping. The end-of-turn marker
    is read from the template itself (what it writes right after an answer), so an ordinary added token
    such as Gemma's `<end_of_turn>` trains as well as a special one; an answer not followed by it is an error.
    """

    name = "chat"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.is_fast:
            raise TrainError("the tokenizer is not a fast tokenizer", "offset mapping needs a tokenizers-backed tokenizer")
        if not tokenizer.chat_template:
            raise TrainError("the tokenizer has no chat template", "use a chat/instruct LLM or set a template")
        self.tokenizer = tokenizer
        self.end_of_turn = self._find_end_of_turn()

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _find_end_of_turn(self) -> str:
        """The text the template writes between an answer and the next user turn, whitespace trimmed."""
        answer, question = "Probe answer 7.", "Probe question 3?"
        one = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        two = one + [{"role": "user", "content": "Second probe question?"}]
        rendered = self._render(two, False)
        pos = rendered.find(answer)
        if pos < 0:
            raise TrainError("the chat template rewrites assistant content", "use a template that keeps answers verbatim")
        after = rendered[pos + len(answer):]
        end_one = self._render(one, False)[pos + len(answer):]
        # The marker is what ends the answer both when a turn follows and when it is the last one.
        common = ""
        for a, b in zip(after, end_one):
            if a != b:
                break
            common += a
        marker = common.strip()
        if not marker:
            raise TrainError("the chat template writes no end-of-turn marker after an answer",
                             "use a template that ends assistant turns with a marker (e.g. eos), or set model.chat_template")
        # A marker like '<|im_end|>\n<|im_start|>' is cut at the first line break: the turn ends at the line end.
        return marker.split("\n")[0].strip() or marker

    def answer_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Return the full templated text and the character spans to train on (answer + end-of-turn)."""
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
            stripped = rest.lstrip()
            if not stripped.startswith(self.end_of_turn):
                raise TrainError(
                    f"an answer is not followed by the template's end-of-turn marker {self.end_of_turn!r}",
                    "the model would never learn to stop: fix the chat template or the data",
                )
            end += len(rest) - len(stripped) + len(self.end_of_turn)
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


class PlainEncoder:
    """LLaVA-1.5's `plain` stage-1 format: `<image>` then the caption then the end token; only the caption trains.

    The instruction is dropped (LLaVA's preprocess_plain keeps only the image and the caption). The end
    token is the tokenizer's eos, so the model also learns where a caption stops.
    """

    name = "plain"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token: str = "<image>") -> None:
        if tokenizer.eos_token is None:
            raise TrainError("the tokenizer has no eos token", "the plain template ends each caption with eos")
        self.tokenizer = tokenizer
        self.image_token = image_token

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels of `[bos] <image> caption eos` (labels on caption + eos)."""
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        users = [m for m in messages if m["role"] == "user"]
        if len(answers) != 1 or len(users) != 1:
            raise TrainError("the plain template takes one instruction and one caption per sample",
                             "use stage template 'chat' for multi-turn data")
        tok = self.tokenizer
        prefix = tok(self.image_token if self.image_token in users[0]["content"] else "", add_special_tokens=True)["input_ids"]
        caption = tok(answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if prefix and prefix[-1] == tok.eos_token_id and tok.eos_token_id != tok.bos_token_id:
            prefix = prefix[:-1]  # a tokenizer that appends eos itself: the caption's eos is the one end
        return prefix + caption, [IGNORE] * len(prefix) + caption


def make_encoder(template: str, tokenizer: PreTrainedTokenizerBase, image_token: str) -> ConversationEncoder | PlainEncoder:
    """The stage's encoder: `plain` (LLaVA-1.5 stage 1) or `chat` (the LLM's chat template)."""
    if template == "plain":
        return PlainEncoder(tokenizer, image_token)
    if template == "chat":
        return ConversationEncoder(tokenizer)
    raise TrainError(f"unknown template '{template}'", "use plain or chat")


@dataclass
class Sample:
    """One encoded sample: compact ids (one `<image>`, or none if text-only), labels, image path, expanded length."""

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

    def count(self, reason: str | None, sid: str) -> None:
        """Record one sample's fate (reason None: kept as is; 'truncated': kept, cut)."""
        self.total += 1
        if reason in (None, "truncated"):
            self.kept += 1
            self.truncated += reason == "truncated"
            return
        setattr(self, reason, getattr(self, reason) + 1)
        self.dropped_ids.append(sid)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (at most 20 dropped ids listed)."""
        d = dict(self.__dict__)
        d["dropped_ids"] = self.dropped_ids[:20]
        return d


DROP_REASONS = ("no_labels", "labels_truncated_away", "image_past_max_length")


@dataclass
class SampleSpec:
    """How records become samples: the encoder, placeholder handling and length limit of one stage."""

    encoder: ConversationEncoder | PlainEncoder
    image_folder: Path
    image_token_id: int
    image_token: str
    num_image_tokens: int
    max_length: int
    image_position: str = "first"


def encode_record(rec: dict[str, Any], spec: SampleSpec, index: int = 0) -> tuple[Sample | None, str | None]:
    """Encode one record; truncate without cutting the image block. Returns (sample or None, drop/cut reason)."""
    sid = str(rec.get("id", index))
    messages = to_messages(rec, spec.image_token, spec.image_position)
    path = resolve_image_path(spec.image_folder, rec, index) if rec.get("image") else None
    ids, labels = spec.encoder.encode(messages)
    if ids.count(spec.image_token_id) != (1 if path else 0):
        raise TrainError(f"sample {sid}: '{spec.image_token}' did not tokenize to one token", "check the tokenizer setup")
    pos = ids.index(spec.image_token_id) if path else len(ids)
    extra = spec.num_image_tokens - 1 if path else 0
    if not any(lab != IGNORE for lab in labels):
        return None, "no_labels"
    if path is not None and pos + spec.num_image_tokens > spec.max_length:
        return None, "image_past_max_length"
    reason = None
    if len(ids) + extra > spec.max_length:
        keep = spec.max_length - extra
        ids, labels = ids[:keep], labels[:keep]
        if not any(lab != IGNORE for lab in labels):
            return None, "labels_truncated_away"
        reason = "truncated"
    if path is not None:
        labels[pos] = IGNORE
    return Sample(ids, labels, path, len(ids) + extra), reason


def check_records(records: Sequence[dict[str, Any]], spec: SampleSpec) -> None:
    """Cheap checks over every record before training (format, placeholder, image file); no tokenizing."""
    missing: list[str] = []
    for i, rec in enumerate(records):
        to_messages(rec, spec.image_token, spec.image_position)
        if rec.get("image"):
            path = resolve_image_path(spec.image_folder, rec, i)
            if not path.is_file():
                missing.append(str(path))
    if missing:
        raise TrainError(
            f"{len(missing)} image file(s) not found, first: {missing[0]}",
            "check data.image_folder (stage image folder) and the samples' 'image' names",
        )


def prepare(records: Iterable[dict[str, Any]], spec: SampleSpec) -> tuple[list[Sample], DataReport]:
    """Encode every record up front and count what is left out (small sets, tests and reports)."""
    records = list(records)
    check_records(records, spec)
    report = DataReport()
    samples: list[Sample] = []
    for i, rec in enumerate(records):
        sample, reason = encode_record(rec, spec, i)
        report.count(reason, str(rec.get("id", i)))
        if sample is not None:
            samples.append(sample)
    if report.kept == 0:
        raise TrainError("no usable samples after masking/truncation", "raise max_length or check the data")
    return samples, report


def estimate_length(rec: dict[str, Any], num_image_tokens: int) -> int:
    """A tokenizer-free length estimate for length grouping (about 4 characters a token, plus the image)."""
    chars = sum(len(str(t.get("value", ""))) for t in rec.get("conversations", []))
    return chars // 4 + 8 * len(rec.get("conversations", [])) + (num_image_tokens if rec.get("image") else 0)


@dataclass
class Encoded:
    """What a data-loader worker hands the collator: one sample's tokens and pixels, or why it was left out."""

    sid: str
    ids: list[int]
    labels: list[int]
    pixels: torch.Tensor | None
    reason: str | None


class LazyDataset(torch.utils.data.Dataset):
    """Records encoded on demand (in data-loader workers): tokenising, masking and image decoding per item.

    Nothing is tokenised up front, so start-up and resume cost only a read of the records.
    """

    def __init__(self, records: list[dict[str, Any]], spec: SampleSpec, transform: ImageTransform) -> None:
        self.records, self.spec, self.transform = records, spec, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Encoded:
        rec = self.records[index]
        sid = str(rec.get("id", index))
        sample, reason = encode_record(rec, self.spec, index)
        if sample is None:
            return Encoded(sid, [], [], None, reason)
        pixels = self.transform(load_image(sample.image, sid)) if sample.image is not None else None
        return Encoded(sid, sample.ids, sample.labels, pixels, reason)


class Collator:
    """Expand each `<image>` to the tower's patch count; pad to a batch, or pack the batch into one row.

    Packed (padding-free): the micro-batch's samples are concatenated into one row with position ids
    restarting at 0 for each sample and no attention mask, which transformers turns into a block-diagonal
    causal mask (sdpa) or varlen kernels (FlashAttention-2): no token attends across samples. Labels are
    the same as unpacked; the first token of each sample is never a target of the previous one.
    """

    def __init__(self, image_token_id: int, num_image_tokens: int, pad_id: int, pack: bool = False) -> None:
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.pad_id = pad_id
        self.pack = pack

    def expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Replace the single image token by num_image_tokens copies (labels IGNORE); text-only rows pass."""
        if self.image_token_id not in ids:
            return ids, labels
        pos = ids.index(self.image_token_id)
        n = self.num_image_tokens
        return ids[:pos] + [self.image_token_id] * n + ids[pos + 1 :], labels[:pos] + [IGNORE] * n + labels[pos + 1 :]

    def __call__(self, batch: list[Encoded]) -> dict[str, Any]:
        dropped = [(e.sid, e.reason) for e in batch if e.ids == []]
        kept = [e for e in batch if e.ids]
        seen = [(e.sid, e.reason) for e in batch]
        if not kept:
            # Every sample of this micro-batch was left out: one row that trains nothing keeps ranks in step.
            kept = [Encoded("empty", [self.pad_id, self.pad_id], [IGNORE, IGNORE], None, None)]
        rows = [self.expand(e.ids, e.labels) for e in kept]
        if self.pack:
            out = self._packed(rows)
        else:
            out = self._padded(rows)
        # Pixel rows follow the image samples' batch order, which is the order the splice fills them in.
        pixels = [e.pixels for e in kept if e.pixels is not None]
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        # Counted on the host now, so the step needs no device sync to normalise the loss.
        out["n_target"] = int((out["labels"][:, 1:] != IGNORE).sum())
        out["n_tokens"] = sum(len(r[0]) for r in rows)
        out["n_samples"] = len(batch) - len(dropped)
        out["seen"] = seen
        return out

    def _padded(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labs) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(labs)] = torch.tensor(labs)
            attention[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    def _packed(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids = [t for r in rows for t in r[0]]
        labels: list[int] = []
        for _, labs in rows:
            # The first token of a sample must not be predicted from the previous sample's last token.
            labels += [IGNORE] + labs[1:]
        positions = [p for r in rows for p in range(len(r[0]))]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


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
