"""Helpers shared by the model/train tests: cached real tokenizer, tiny random models, fixture data."""
from __future__ import annotations

import copy
import functools
import json
import random
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from model.language import add_image_token, load_tokenizer
from model.vision import VisionTower

REPO = Path(__file__).resolve().parent.parent
COCO = REPO.parent / "shared" / "coco-mini"

VICUNA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + ' ' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@functools.lru_cache(maxsize=1)
def _smollm_tokenizer() -> PreTrainedTokenizerBase:
    tok = load_tokenizer("smollm2-embedded")
    add_image_token(tok)
    return tok


def smollm_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's real tokenizer (ChatML template) with `<image>`; a copy, safe to mutate."""
    return copy.deepcopy(_smollm_tokenizer())


def vicuna_tokenizer() -> PreTrainedTokenizerBase:
    """Same vocabulary with a Vicuna/LLaVA-1.5-style template (USER:/ASSISTANT:, eos ends a turn)."""
    tok = smollm_tokenizer()
    tok.chat_template = VICUNA_TEMPLATE
    return tok


def tiny_llm(tok: PreTrainedTokenizerBase, seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    """Random 2-layer Llama sized to the tokenizer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_clip_config() -> dict:
    """Tiny CLIP vision config: 32px images, 8px patches -> 16 image tokens."""
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=8)


def tiny_clip_tower(seed: int = 0, layer: int = -2) -> VisionTower:
    """Random tiny CLIP tower."""
    torch.manual_seed(seed)
    cfg = dict(tiny_clip_config())
    cfg.pop("model_type")
    return VisionTower(CLIPVisionModel(CLIPVisionConfig(**cfg)), layer)


def save_tiny_llm(directory: Path, seed: int = 0) -> Path:
    """A tiny random chat LLM saved as a local model folder (the real from_pretrained path)."""
    tok = smollm_tokenizer()
    llm = tiny_llm(tok, seed)
    llm.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def coco_captions(split: str) -> list[tuple[str, list[str]]]:
    """(file_name, captions) for every coco-mini image of a split, sorted by file name."""
    ann = json.loads((COCO / "annotations" / f"captions_{split}.json").read_text())
    names = {im["id"]: im["file_name"] for im in ann["images"]}
    caps: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    return sorted((names[i], c) for i, c in caps.items())


def write_caption_pairs(path: Path, split: str = "train2017", n: int = 16, seed: int = 0) -> Path:
    """Stage-1 style pairs (`<image>` before or after a brief instruction) from real COCO captions."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for k, (name, caps) in enumerate(coco_captions(split)[:n]):
            human = rng.choice(["<image>\nDescribe the image concisely.", "Give a brief caption.\n<image>"])
            rec = {"id": f"cap-{k}", "image": name, "conversations": [
                {"from": "human", "value": human}, {"from": "gpt", "value": caps[0]}], "meta": {"split": split}}
            f.write(json.dumps(rec) + "\n")
    return path


def write_instruct(path: Path, split: str = "val2017", n: int = 16, as_array: bool = False) -> Path:
    """Multi-turn instruction samples from real captions (LLaVA format; JSONL or JSON array)."""
    recs = []
    for k, (name, caps) in enumerate(coco_captions(split)[:n]):
        recs.append({"id": f"ins-{k}", "image": name, "split": "conversation", "conversations": [
            {"from": "human", "value": "<image>\nWhat is going on in this picture?"},
            {"from": "gpt", "value": " ".join(caps[:2])},
            {"from": "human", "value": "Anything else?"},
            {"from": "gpt", "value": caps[2]},
        ]})
    if as_array:
        path.write_text(json.dumps(recs))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def encode_batch(tok: PreTrainedTokenizerBase, model, proc, recs: list[dict], folder: Path,  # noqa: ANN001
                 max_length: int = 512, pack: bool = False, template: str = "chat") -> dict:
    """Records -> one collated batch through the trainer's own path (lazy dataset, image transform, collator)."""
    from train.data import Collator, LazyDataset, SampleSpec, make_encoder
    from train.images import ImageTransform

    spec = SampleSpec(make_encoder(template, tok, "<image>"), folder, model.image_token_id, "<image>",
                      model.num_image_tokens, max_length)
    data = LazyDataset(recs, spec, ImageTransform.from_processor(proc))
    return Collator(model.image_token_id, model.num_image_tokens, tok.pad_token_id, pack=pack)(
        [data[i] for i in range(len(recs))])
