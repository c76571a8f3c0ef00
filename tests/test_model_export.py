"""Export round trip: LlavaForConditionalGeneration + AutoProcessor reproduce our model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from conftest_train import COCO, coco_captions, smollm_tokenizer, tiny_clip_tower, tiny_llm
from model.export import export
from model.llava import IGNORE, LlavaLite
from model.projector import build_projector
from model.vision import build_image_processor
from train.data import Collator


def _model(kind: str, seed: int = 0) -> tuple:
    tok = smollm_tokenizer()
    torch.manual_seed(seed + 1)
    model = LlavaLite(tiny_clip_tower(seed), build_projector(kind, 32, 64), tiny_llm(tok, seed),
                      tok.convert_tokens_to_ids("<image>")).eval()
    return tok, model, build_image_processor(None, model.tower, True)


def _roundtrip(tmp_path: Path, tok, model: LlavaLite, proc, kind: str) -> float:
    """Our logits (computed first: export merges LoRA in place) vs the reloaded HF model's."""
    image = Image.open(COCO / "val2017" / coco_captions("val2017")[0][0]).convert("RGB")  # non-square
    question = "What is in the image?"
    # Training-time path: chat template on "<image>\n<question>", then the collator's expansion.
    text = tok.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids, _ = Collator(model.image_token_id, model.num_image_tokens, tok.pad_token_id).expand(ids, [IGNORE] * len(ids))
    ours_px = proc(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = model(torch.tensor([ids]), ours_px)

    out = export(model, tok, proc, kind, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    # The shipped processor reproduces the training-time tokens and pixels exactly.
    assert inputs["input_ids"][0].tolist() == ids
    assert torch.allclose(ours_px, inputs["pixel_values"])
    with torch.no_grad():
        theirs = hf(**inputs).logits
    gen = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]
    return float((ours - theirs).abs().max())


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_export_logits_match(tmp_path: Path, kind: str) -> None:
    tok, model, proc = _model(kind)
    with torch.no_grad():  # make the projector non-trivial so a dropped bias or wrong layer would show
        for p in model.projector.parameters():
            p.normal_(0, 0.5)
    assert _roundtrip(tmp_path, tok, model, proc, kind) < 1e-4


def test_export_merges_lora(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    tok, model, proc = _model("linear", seed=3)
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # B starts at zero; make the adapter matter
    assert _roundtrip(tmp_path, tok, model, proc, "linear") < 1e-4
