"""Export round trip: LlavaForConditionalGeneration + AutoProcessor reproduce our model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from conftest_train import COCO, coco_captions, smollm_tokenizer, tiny_clip_tower, tiny_llm
from model.export import export
from model.llava import LlavaLite
from model.projector import build_projector
from model.vision import build_image_processor


def _model(kind: str, seed: int = 0) -> tuple:
    tok = smollm_tokenizer()
    torch.manual_seed(seed + 1)
    model = LlavaLite(tiny_clip_tower(seed), build_projector(kind, 32, 64), tiny_llm(tok, seed),
                      tok.convert_tokens_to_ids("<image>")).eval()
    return tok, model, build_image_processor(None, model.tower, True)


def _roundtrip(tmp_path: Path, tok, model: LlavaLite, proc, kind: str) -> float:
    out = export(model, tok, proc, kind, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    image = Image.open(COCO / "val2017" / coco_captions("val2017")[0][0])  # non-square: exercises pad-to-square
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens
    # Same preprocessing as training: the exported image processor is the one the collator used.
    ours_px = proc(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours_px, inputs["pixel_values"])
    with torch.no_grad():
        ours = model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
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
