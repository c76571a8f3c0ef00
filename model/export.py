"""Export to transformers' LlavaForConditionalGeneration format (+ processor), loadable by transformers and vLLM."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase

from model.llava import LlavaLite

log = logging.getLogger(__name__)

# Prepended to the LLM's own (text-only) chat template: flattens processor-style content lists
# ([{"type": "image"}, {"type": "text", ...}]) into the `<image>\n<text>` strings the model was trained on.
_MULTIMODAL_PREAMBLE = (
    "{%- set _mm = namespace(msgs=[]) -%}"
    "{%- for _m in messages -%}"
    "{%- if _m['content'] is string -%}{%- set _c = _m['content'] -%}"
    "{%- else -%}{%- set _t = namespace(s='') -%}"
    "{%- for _p in _m['content'] -%}"
    "{%- if _p['type'] == 'image' -%}{%- set _t.s = _t.s + '<image>\\n' -%}"
    "{%- elif _p['type'] == 'text' -%}{%- set _t.s = _t.s + _p['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set _c = _t.s -%}{%- endif -%}"
    "{%- set _mm.msgs = _mm.msgs + [{'role': _m['role'], 'content': _c}] -%}"
    "{%- endfor -%}"
    "{%- set messages = _mm.msgs -%}"
)


def multimodal_chat_template(text_template: str, image_token: str = "<image>") -> str:
    """Wrap a text chat template so it also accepts image/text content lists."""
    return _MULTIMODAL_PREAMBLE.replace("<image>", image_token) + text_template


def _merged_llm(model: LlavaLite) -> nn.Module:
    """The plain causal LM, with LoRA adapters merged in if present."""
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):
        # Merge into a copy-free unwrapped model; the caller's model is finished training by now.
        llm = llm.merge_and_unload()
    return llm


def llava_config(model: LlavaLite, llm: nn.Module, projector_kind: str) -> LlavaConfig:
    """LlavaConfig mirroring our tower/projector/LLM."""
    tower = model.tower
    text_cfg = llm.config.to_dict()
    return LlavaConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=text_cfg,
        image_token_index=model.image_token_id,
        image_seq_length=tower.num_patches,
        # A linear projector exports exactly as linear_1 -> identity -> linear_2 = I.
        projector_hidden_act="gelu" if projector_kind == "mlp2x_gelu" else "linear",
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy="default" if tower.has_cls else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )


@torch.no_grad()
def to_hf_llava(model: LlavaLite, projector_kind: str, dtype: torch.dtype | None = None) -> LlavaForConditionalGeneration:
    """Build an equivalent LlavaForConditionalGeneration with our weights (in `dtype`, default the LLM's)."""
    llm = _merged_llm(model)
    cfg = llava_config(model, llm, projector_kind)
    dtype = dtype or next(llm.parameters()).dtype
    hf = LlavaForConditionalGeneration(cfg).to(dtype)
    hf.model.vision_tower.load_state_dict(model.tower.model.state_dict())
    hf.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    hf.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    proj = hf.model.multi_modal_projector
    first = model.projector[0]
    proj.linear_1.load_state_dict(first.state_dict())
    if projector_kind == "mlp2x_gelu":
        proj.linear_2.load_state_dict(model.projector[2].state_dict())
    else:
        proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0], dtype=proj.linear_2.weight.dtype))
        proj.linear_2.bias.zero_()
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf.eval()
    return hf


def build_processor(
    tokenizer: PreTrainedTokenizerBase, image_processor: Any, model: LlavaLite, image_token: str = "<image>"
) -> LlavaProcessor:
    """LlavaProcessor whose `<image>` expansion equals our tower's patch count."""
    template = multimodal_chat_template(tokenizer.chat_template, image_token)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model.tower.patch_size,
        vision_feature_select_strategy="default" if model.tower.has_cls else "full",
        num_additional_image_tokens=1 if model.tower.has_cls else 0,
        chat_template=template,
        image_token=image_token,
    )


def export(
    model: LlavaLite,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    projector_kind: str,
    out_dir: str | Path,
    image_token: str = "<image>",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write model + processor to out_dir; `LlavaForConditionalGeneration.from_pretrained` reads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf_llava(model, projector_kind, dtype)
    eot = tokenizer.eos_token_id
    hf.generation_config.eos_token_id = eot
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    hf.save_pretrained(str(out))
    build_processor(tokenizer, image_processor, model, image_token).save_pretrained(str(out))
    log.info("exported LlavaForConditionalGeneration checkpoint (%s) to %s", str(hf.dtype).removeprefix("torch."), out)
    return out
