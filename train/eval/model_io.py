"""An exported checkpoint (transformers LlavaForConditionalGeneration + processor): answers and held-out loss.

Only the exported format is read, so evaluation does not depend on the trainer's internals; the loss uses
the trainer's own conversation encoder so its masking is training's masking.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image

from datagen.errors import VisinstructError

log = logging.getLogger(__name__)

IGNORE = -100  # the label value transformers' losses skip (the trainer uses the same)


@dataclass(frozen=True)
class Prompt:
    """One question about one image."""

    image: Path
    question: str


def checkpoint_hash(model_dir: Path) -> str:
    """Short SHA-256 over the checkpoint's weight files: two reports name the same weights or not."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def open_image(path: Path) -> Image.Image:
    """An image as RGB, or one clear error."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise VisinstructError(f"image not found: {path}", "check --coco-root / --coco-split or the samples' image names") from None
    except OSError as exc:
        raise VisinstructError(f"cannot read image {path} ({exc})", "replace or remove the broken file") from None


class ExportedModel:
    """Greedy answers and answer-token losses from an exported LLaVA checkpoint folder."""

    def __init__(self, model_dir: Path, batch_size: int = 8) -> None:
        # transformers is heavy to import: loaded here so `--help` and report-only commands stay fast.
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise VisinstructError(f"no exported model in {self.model_dir}", "pass a final/ folder written by training (make train)")
        self.processor = AutoProcessor.from_pretrained(str(self.model_dir))
        self.processor.tokenizer.padding_side = "left"  # decoder-only batching: prompts end together
        self.model = LlavaForConditionalGeneration.from_pretrained(str(self.model_dir)).eval()
        self.batch_size = batch_size
        self.image_token_id = int(self.model.config.image_token_index)
        self.image_tokens = int(self.model.config.image_seq_length)

    def _prompt_text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.no_grad()
    def answer(self, prompts: list[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy answers, in order, batched."""
        answers: list[str] = []
        tokenizer = self.processor.tokenizer
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            inputs = self.processor(images=[open_image(p.image) for p in batch],
                                    text=[self._prompt_text(p.question) for p in batch],
                                    padding=True, return_tensors="pt")
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
            width = inputs["input_ids"].shape[1]
            answers += [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        return answers

    def encode(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """Training's encoding of one LLaVA sample: ids with `<image>` expanded, labels only on answers."""
        from train.data import ConversationEncoder, to_messages  # the trainer's masking, imported on use

        encoder = getattr(self, "_encoder", None) or ConversationEncoder(self.processor.tokenizer)
        self._encoder = encoder
        ids, labels = encoder.encode(to_messages(record, self.processor.image_token))
        if self.image_token_id in ids:
            pos = ids.index(self.image_token_id)
            n = self.image_tokens
            ids = ids[:pos] + [self.image_token_id] * n + ids[pos + 1:]
            labels = labels[:pos] + [IGNORE] * n + labels[pos + 1:]
        return ids, labels

    @torch.no_grad()
    def answer_loss(self, records: Iterable[dict[str, Any]], image_folder: Path) -> list[tuple[float, int]]:
        """(summed cross-entropy over answer tokens, answer-token count) per sample, one sample per pass."""
        results: list[tuple[float, int]] = []
        for record in records:
            ids, labels = self.encode(record)
            kwargs: dict[str, Any] = {"input_ids": torch.tensor([ids])}
            if record.get("image"):
                image = open_image(Path(image_folder) / str(record["image"]))
                kwargs["pixel_values"] = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            logits = self.model(**kwargs).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
            results.append((float(loss), int((target != IGNORE).sum())))
        return results
