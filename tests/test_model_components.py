"""Vision tower, projector, image-token expansion and feature splicing."""
from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from conftest_train import COCO, coco_captions, encode_batch, smollm_tokenizer, tiny_clip_tower, tiny_llm
from model.errors import TrainError
from model.llava import IGNORE, LlavaLite, enable_activation_checkpointing
from model.projector import build_projector
from model.vision import VisionTower, build_image_processor
from train.data import length_grouped_batches


@pytest.mark.parametrize("kind,n_params", [("linear", 32 * 64 + 64), ("mlp2x_gelu", 32 * 64 + 64 + 64 * 64 + 64)])
def test_projector_shapes(kind: str, n_params: int) -> None:
    proj = build_projector(kind, 32, 64)
    assert proj(torch.randn(3, 16, 32)).shape == (3, 16, 64)
    assert sum(p.numel() for p in proj.parameters()) == n_params


def test_unknown_projector() -> None:
    with pytest.raises(TrainError, match="unknown projector 'qformer'"):
        build_projector("qformer", 32, 64)


def test_clip_tower_drops_cls_and_selects_layer() -> None:
    tower = tiny_clip_tower(layer=-2)
    px = torch.randn(2, 3, 32, 32)
    feats = tower(px)
    assert tower.num_patches == 16 and feats.shape == (2, 16, 32)
    ref = tower.model(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.equal(feats, ref)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.model.training, "frozen tower stays in eval mode"


def test_siglip_tower_keeps_all_patches() -> None:
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8)
    tower = VisionTower(SiglipVisionModel(cfg), -1)
    assert not tower.has_cls and tower(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_pad_to_square_processor() -> None:
    tower = tiny_clip_tower()
    proc = build_image_processor(None, tower, pad_to_square=True)
    wide = Image.new("RGB", (96, 32), (255, 0, 0))
    px = proc(images=[wide], return_tensors="pt")["pixel_values"]
    assert px.shape == (1, 3, 32, 32)
    # Padded rows (top/bottom) hold the mean colour, which normalises to ~0; the centre stays red.
    assert px[0, :, 0, 16].abs().max() < 0.02 and px[0, 0, 16, 16] > 1.0


@pytest.fixture(scope="module")
def setup() -> tuple:
    tok = smollm_tokenizer()
    model = LlavaLite(tiny_clip_tower(), build_projector("linear", 32, 64), tiny_llm(tok),
                      tok.convert_tokens_to_ids("<image>"))
    proc = build_image_processor(None, model.tower, True)
    return tok, model, proc


def _batch(tok, model, proc, n: int = 3) -> dict[str, torch.Tensor]:
    recs = []
    for k, (name, caps) in enumerate(coco_captions("val2017")[:n]):
        q = "<image>\nWhat is shown?" + " Please be brief." * k  # different lengths -> padding
        recs.append({"id": k, "image": name, "conversations": [{"from": "human", "value": q},
                                                               {"from": "gpt", "value": caps[0]}]})
    return encode_batch(tok, model, proc, recs, COCO / "val2017")


def test_collator_expands_image_token(setup: tuple) -> None:
    tok, model, proc = setup
    b = _batch(tok, model, proc)
    ids, labels, att = b["input_ids"], b["labels"], b["attention_mask"]
    assert b["pixel_values"].shape == (3, 3, 32, 32)
    for i in range(3):
        pos = (ids[i] == model.image_token_id).nonzero().flatten()
        assert len(pos) == 16 and torch.equal(pos, torch.arange(pos[0], pos[0] + 16)), "one contiguous block"
        assert (labels[i][pos] == IGNORE).all()
        assert (labels[i][att[i] == 0] == IGNORE).all(), "padding never trains"
    assert att.sum(1).unique().numel() == 3


def test_features_spliced_at_image_positions(setup: tuple) -> None:
    tok, model, proc = setup
    b = _batch(tok, model, proc)
    with torch.no_grad():
        embeds = model.embed(b["input_ids"], b["pixel_values"])
        feats = model.image_features(b["pixel_values"])
        plain = model.llm.get_input_embeddings()(b["input_ids"])
    mask = b["input_ids"] == model.image_token_id
    for i in range(3):
        assert torch.equal(embeds[i][mask[i]], feats[i]), "sample i's patches, in order, at sample i's block"
    assert torch.equal(embeds[~mask], plain[~mask]), "text positions untouched"


def test_splice_count_mismatch_is_an_error(setup: tuple) -> None:
    tok, model, proc = setup
    b = _batch(tok, model, proc, n=2)
    ids = b["input_ids"].clone()
    ids[0, (ids[0] == model.image_token_id).nonzero()[0]] = 0
    with pytest.raises(TrainError, match="image tokens in the batch"):
        model.embed(ids, b["pixel_values"])


def test_loss_path_equals_full_logits(setup: tuple) -> None:
    tok, model, proc = setup
    b = _batch(tok, model, proc)
    with torch.no_grad():
        fast = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
        logits = model(b["input_ids"], b["pixel_values"], b["attention_mask"])
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                ignore_index=IGNORE, reduction="sum")
    assert torch.allclose(fast, ref, rtol=1e-5)


def test_length_grouped_batches_deterministic_and_complete() -> None:
    lengths = [(i * 37) % 101 for i in range(50)]
    a = length_grouped_batches(lengths, 4, seed=1, epoch=0, mega=4)
    assert a == length_grouped_batches(lengths, 4, seed=1, epoch=0, mega=4)
    assert a != length_grouped_batches(lengths, 4, seed=1, epoch=1, mega=4)
    assert sorted(i for b in a for i in b) == list(range(50))
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert pad(a) < pad(length_grouped_batches(lengths, 4, seed=1, epoch=0, group=False))


def test_tower_from_saved_full_clip_checkpoint(tmp_path) -> None:
    """The real path: a local (or hub) CLIP dual-encoder checkpoint; only its vision half is loaded."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from model.vision import build_vision_tower

    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    full = CLIPModel(cfg)
    full.save_pretrained(str(tmp_path))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(tmp_path))
    tower = build_vision_tower(str(tmp_path), None, -2, None, 0)
    x = torch.randn(1, 3, 32, 32)
    ref = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert type(tower.model).__name__ == "CLIPVisionModel" and torch.allclose(tower(x), ref)
    proc = build_image_processor(str(tmp_path), tower, pad_to_square=True)
    assert proc(images=[Image.new("RGB", (50, 20))], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(TrainError, match="does not exist"):
        build_vision_tower("./no/such/tower", None, -2, None, 0)


def test_text_only_sample_mixes_with_image_samples(setup: tuple) -> None:
    """LLaVA-1.5's mix has text-only samples (no "image"): no placeholder, no pixels, same batch."""
    tok, model, proc = setup
    name = coco_captions("val2017")[0][0]
    recs = [{"id": "t", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
            {"id": "i", "image": name, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                         {"from": "gpt", "value": "A photo."}]}]
    b = encode_batch(tok, model, proc, recs, COCO / "val2017", 256)
    assert b["pixel_values"].shape[0] == 1
    with torch.no_grad():
        embeds = model.embed(b["input_ids"], b["pixel_values"])
        feats = model.image_features(b["pixel_values"])
    assert torch.equal(embeds[1][b["input_ids"][1] == model.image_token_id], feats[0])
    text_only = encode_batch(tok, model, proc, recs[:1], COCO / "val2017", 256)
    assert "pixel_values" not in text_only
    model.train()
    loss = model(text_only["input_ids"], None, text_only["attention_mask"], text_only["labels"])
    loss.backward()
    model.eval()
    assert all(p.grad is not None for p in model.projector.parameters()), "DDP needs projector grads every step"
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    tok = smollm_tokenizer()
    grads = []
    for ckpt in (False, True):
        model = LlavaLite(tiny_clip_tower(), build_projector("mlp2x_gelu", 32, 64), tiny_llm(tok),
                          tok.convert_tokens_to_ids("<image>"))
        if ckpt:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)  # by the name this transformers does not deprecate
                enable_activation_checkpointing(model.llm)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.llm.modules())
        model.train()
        proc = build_image_processor(None, model.tower, True)
        b = _batch(tok, model, proc, n=2)
        model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-5) for k in grads[0])
