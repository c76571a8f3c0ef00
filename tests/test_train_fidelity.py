"""LLaVA-1.5 fidelity and the fast paths: plain template, <image> first, end-of-turn, packing, images, chunked loss."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest_train import COCO, REPO, coco_captions, encode_batch, smollm_tokenizer, tiny_clip_tower, tiny_llm
from model.errors import TrainError
from model.llava import IGNORE, LlavaLite, chunked_cross_entropy
from model.projector import build_projector
from model.vision import build_image_processor
from train.build import plan_schedule
from train.config import StageConfig, load_config
from train.data import ConversationEncoder, PlainEncoder, to_messages
from train.images import ImageTransform, load_image

IMAGE = "<image>"


@pytest.fixture(scope="module")
def setup() -> tuple:
    tok = smollm_tokenizer()
    torch.manual_seed(0)
    model = LlavaLite(tiny_clip_tower(), build_projector("mlp2x_gelu", 32, 64), tiny_llm(tok),
                      tok.convert_tokens_to_ids(IMAGE)).eval()
    return tok, model, build_image_processor(None, model.tower, True)


def _records(n: int, multi_turn: bool = True) -> list[dict]:
    recs = []
    for k, (name, caps) in enumerate(coco_captions("val2017")[:n]):
        turns = [{"from": "human", "value": f"What is shown?{' Be brief.' * k}\n<image>"},
                 {"from": "gpt", "value": caps[0]}]
        if multi_turn and k % 2:
            turns += [{"from": "human", "value": "More?"}, {"from": "gpt", "value": caps[1]}]
        recs.append({"id": f"r{k}", "image": name, "conversations": turns})
    recs.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]})
    return recs


def test_image_moves_to_the_start_of_the_first_turn() -> None:
    rec = {"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "What is it?\n<image>"},
                                                      {"from": "gpt", "value": "A bus."}]}
    assert to_messages(rec, IMAGE)[0]["content"] == "<image>\nWhat is it?"
    assert to_messages(rec, IMAGE, "keep")[0]["content"] == "What is it?\n<image>"


def test_plain_template_labels_only_caption_and_end(setup: tuple) -> None:
    tok, _, _ = setup
    rec = {"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "Describe briefly.\n<image>"},
                                                      {"from": "gpt", "value": "A red bus on a street."}]}
    ids, labels = PlainEncoder(tok).encode(to_messages(rec, IMAGE))
    image_id = tok.convert_tokens_to_ids(IMAGE)
    assert image_id in ids and "Describe" not in tok.decode(ids), "the instruction is dropped"
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(kept) == "A red bus on a street." + tok.eos_token and kept[-1] == tok.eos_token_id
    assert all(lab == IGNORE for lab in labels[: ids.index(image_id) + 1])


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def test_end_of_turn_comes_from_the_template_not_special_tokens() -> None:
    """Gemma-style: the end-of-turn marker is an ordinary added token, not in all_special_tokens."""
    tok = smollm_tokenizer()
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = GEMMA_TEMPLATE
    assert "<end_of_turn>" not in tok.all_special_tokens
    enc = ConversationEncoder(tok)
    assert enc.end_of_turn == "<end_of_turn>"
    rec = {"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                      {"from": "gpt", "value": "A bus."}, {"from": "human", "value": "And?"},
                                                      {"from": "gpt", "value": "Red."}]}
    ids, labels = enc.encode(to_messages(rec, IMAGE))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    trained_eots = [i for i, (t, lab) in enumerate(zip(ids, labels)) if t == eot and lab != IGNORE]
    assert len(trained_eots) == 2, "each answer's end-of-turn trains, so the model learns to stop"


def test_answer_without_end_of_turn_is_an_error() -> None:
    tok = smollm_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                         "{% if not m['content'].endswith('!') %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    enc = ConversationEncoder(tok)
    rec = {"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "Stop!"}]}
    with pytest.raises(TrainError, match="not followed by the template's end-of-turn marker"):
        enc.encode(to_messages(rec, IMAGE))


def test_packed_batch_equals_unpacked(setup: tuple) -> None:
    """Same labels, same summed loss: position ids restart per sample and no token attends across samples."""
    tok, model, proc = setup
    recs = _records(4)
    padded = encode_batch(tok, model, proc, recs, COCO / "val2017")
    packed = encode_batch(tok, model, proc, recs, COCO / "val2017", pack=True)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum())  # no padding at all
    rows = [padded["labels"][i][padded["attention_mask"][i].bool()] for i in range(len(recs))]
    expect = torch.cat([torch.cat([torch.tensor([IGNORE]), r[1:]]) for r in rows])
    assert torch.equal(packed["labels"][0], expect) and packed["n_target"] == padded["n_target"]
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    with torch.no_grad():
        a = model(padded["input_ids"], padded["pixel_values"], padded["attention_mask"], padded["labels"])
        b = model(packed["input_ids"], packed["pixel_values"], None, packed["labels"], packed["position_ids"])
    assert torch.allclose(a, b, rtol=1e-4), (float(a), float(b))


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(rows=st.integers(1, 300), chunk=st.integers(1, 64))
def test_chunked_cross_entropy_equals_one_pass(rows: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(rows * 100 + chunk)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(rows, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (rows,), generator=g)
    whole = chunked_cross_entropy(hidden, target, head, 0)
    (gw,) = torch.autograd.grad(whole, hidden)
    part = chunked_cross_entropy(hidden, target, head, chunk)
    (gp,) = torch.autograd.grad(part, hidden)
    assert torch.allclose(whole, part, rtol=1e-5) and torch.allclose(gw, gp, atol=1e-6)


@pytest.mark.parametrize("pad", [True, False])
def test_fast_image_transform_equals_the_exported_processor(pad: bool) -> None:
    """Training pixels equal the pixels the exported processor gives at inference, pad and crop alike."""
    from transformers import LlavaImageProcessor

    proc = LlavaImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, do_pad=pad,
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
    transform = ImageTransform.from_processor(proc)
    images = [load_image(COCO / "val2017" / name) for name, _ in coco_captions("val2017")[:6]]
    images.append(Image.new("RGB", (30, 90), (10, 200, 30)))  # tall, smaller than the target
    ref = proc(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([transform(im) for im in images])
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-5)


def test_schedule_floor_and_warmup_are_derived_and_explained() -> None:
    st_cfg = StageConfig(batch_size=4, grad_accum=2, epochs=1, min_steps=50, min_warmup_steps=5, warmup_ratio=0.03)
    s = plan_schedule(100, st_cfg, world=1)
    assert s.per_epoch == 12 and s.total == 50 and s.warmup == 5
    assert "min_steps 50" in s.why and "min_warmup_steps 5" in s.why
    big = plan_schedule(100_000, st_cfg, world=2)
    assert big.total == 6250 and big.warmup == round(0.03 * 6250)
    with pytest.raises(TrainError, match="fewer than one optimizer step"):
        plan_schedule(3, st_cfg, world=1)


def test_llava15_defaults() -> None:
    cfg = load_config("compact-gpu")
    assert (cfg.stage1.template, cfg.stage1.image_mode) == ("plain", "crop")
    assert (cfg.stage2.template, cfg.stage2.image_mode) == ("chat", "pad")
    assert cfg.stage2.image_folder.endswith("train2017"), "stage 2 must not train on val2017 (eval overlap)"
    assert cfg.tf32 and cfg.stage2.lora.r == 128 and cfg.stage2.lora.alpha == 256
    smoke = load_config("smoke-cpu", ["stage1.template=chat", "stage1.image_mode=pad"])
    assert smoke.stage1.template == "chat" and smoke.stage1.image_mode == "pad"  # the paper's variant, as an option
    with pytest.raises(TrainError, match="stage1.template is 'fancy'"):
        load_config("smoke-cpu", ["stage1.template=fancy"])
    with pytest.raises(TrainError, match="report_to"):
        load_config("smoke-cpu", ["report_to=mlflow"])


def test_model_package_does_not_import_datagen() -> None:
    import subprocess
    import sys

    # train/ reads samples through datagen's one sample module (issue 8); model/ must stay independent.
    code = ("import sys, model.llava, model.export, model.errors; "
            "print(sorted(m for m in sys.modules if m == 'datagen' or m.startswith('datagen.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
