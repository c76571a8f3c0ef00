"""Composite model: frozen vision tower -> projector -> causal LM, image features spliced at `<image>`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.errors import TrainError
from model.language import add_image_token, check_attention, fit_embeddings, load_llm, load_tokenizer
from model.projector import build_projector
from model.vision import VisionTower, build_image_processor, build_vision_tower

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class ModelConfig:
    """What to build: tower, projector, LLM."""

    llm: str = "smollm2-embedded"
    llm_gguf_file: str | None = None
    vision_tower: str | None = None
    vision_config: dict[str, Any] | None = None
    vision_layer: int = -2
    projector: str = "linear"
    image_token: str = "<image>"
    dtype: str = "float32"  # trained weights (master copy; compute runs in bf16 autocast on GPU)
    frozen_dtype: str = "auto"  # frozen parts (tower; LLM when it does not train): auto = bf16 on GPU, else dtype
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (when installed) | eager
    chat_template: str | None = None  # for LLMs without one (e.g. Vicuna-7B-v1.5); else the tokenizer's own


class LlavaLite(nn.Module):
    """Vision tower + projector + causal LM; one `<image>` block of num_patches tokens per sample."""

    def __init__(self, tower: VisionTower, projector: nn.Module, llm: PreTrainedModel, image_token_id: int,
                 loss_chunk: int = 4096) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.loss_chunk = loss_chunk

    @property
    def num_image_tokens(self) -> int:
        """Tokens each image occupies in the LLM sequence."""
        return self.tower.num_patches

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Project tower features into the LLM embedding space: (B, num_patches, text_hidden)."""
        feats = self.tower(pixel_values)
        dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image positions replaced by projected image features."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        if pixel_values is None:
            if bool(mask.any()):
                raise TrainError("image tokens in the batch but no pixel_values", "pass the images (use the collator)")
            if self.training:
                # A text-only batch must still touch the projector, or DDP waits forever for its gradients.
                embeds = embeds + 0.0 * sum(p.sum() for p in self.projector.parameters())
            return embeds
        feats = self.image_features(pixel_values)
        if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise TrainError(
                f"{int(mask.sum())} image tokens in the batch but {feats.shape[0]}x{feats.shape[1]} image features",
                "each sample needs exactly one <image> expanded to the tower's patch count (use the collator)",
            )
        # Row-major order of the mask matches (sample, patch) order of the features: one vectorised write.
        embeds = embeds.clone()
        embeds[mask] = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Without labels: next-token logits (B, L, V). With labels: summed token cross-entropy.

        Packed rows pass `position_ids` restarting at 0 for each sample and no attention mask: transformers
        then masks attention block-diagonally (sdpa) or runs varlen kernels (FlashAttention-2).
        The loss path runs the LM head only at labelled positions, in chunks of `loss_chunk` rows that are
        recomputed in backward, so vocabulary logits never exist for more than one chunk at a time.
        """
        embeds = self.embed(input_ids, pixel_values)
        if labels is None or getattr(self.llm.config, "final_logit_softcapping", None):
            logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits
            if labels is None:
                return logits
            return F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
            )
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False)[0]
        target = labels[:, 1:]
        keep = target != IGNORE
        return chunked_cross_entropy(hidden[:, :-1][keep], target[keep], self.llm.get_output_embeddings(),
                                     self.loss_chunk)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only parameters that train (projector, and LLM/LoRA weights in stage 2): what checkpoints hold."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}


def _head_loss(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, target: torch.Tensor, head: nn.Module, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) vs target, at most `chunk` rows of logits alive at once."""
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return _head_loss(head, hidden, target)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        # Recomputed in backward: the (chunk, vocab) logits are freed as soon as the chunk's loss is known.
        total = total + checkpoint(_head_loss, head, hidden[start : start + chunk], target[start : start + chunk],
                                   use_reentrant=False)
    return total


def enable_activation_checkpointing(llm: Any) -> None:
    """Recompute the LLM's activations in the backward pass (non-re-entrant checkpointing), by the name the installed
    transformers gives it: `activation_checkpointing_enable` from 5.x, where `gradient_checkpointing_enable` warns
    that v6 drops it; the old name before. A PEFT wrapper passes either on to its model."""
    enable = getattr(llm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def resolve_frozen_dtype(cfg: ModelConfig) -> torch.dtype:
    """Frozen weights: bf16 on a bf16-capable GPU when `auto` (they take no optimiser state), else cfg.dtype."""
    if cfg.frozen_dtype != "auto":
        return torch_dtype(cfg.frozen_dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch_dtype(cfg.dtype)


def torch_dtype(name: str) -> torch.dtype:
    """Map a config dtype name to torch."""
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise TrainError(f"unknown dtype '{name}'", "use float32, bfloat16 or float16") from None


def build_model(
    cfg: ModelConfig, tower_cache: Path | None = None, seed: int = 0, pad_to_square: bool = True
) -> tuple[LlavaLite, PreTrainedTokenizerBase, Any]:
    """Build (model, tokenizer with `<image>`, image processor) from a ModelConfig."""
    tokenizer = load_tokenizer(cfg.llm, cfg.llm_gguf_file)
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    if not tokenizer.chat_template:
        raise TrainError(f"tokenizer of '{cfg.llm}' has no chat template", "use an instruct/chat LLM")
    image_token_id = add_image_token(tokenizer, cfg.image_token)
    check_attention(cfg.attn_implementation)
    tower = build_vision_tower(cfg.vision_tower, cfg.vision_config, cfg.vision_layer, tower_cache, seed,
                               cfg.attn_implementation)
    tower.to(resolve_frozen_dtype(cfg))
    image_processor = build_image_processor(cfg.vision_tower, tower, pad_to_square)
    llm = load_llm(cfg.llm, cfg.llm_gguf_file, torch_dtype(cfg.dtype), cfg.attn_implementation)
    fit_embeddings(llm, len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # projector init independent of whatever ran before
        projector = build_projector(cfg.projector, tower.hidden_size, llm.config.hidden_size)
    projector.to(torch_dtype(cfg.dtype))
    model = LlavaLite(tower, projector, llm, image_token_id)
    log.info(
        "model: tower %s (%d image tokens), projector %s, LLM %s (%.1fM params)",
        tower.model_type, tower.num_patches, cfg.projector, cfg.llm, sum(p.numel() for p in llm.parameters()) / 1e6,
    )
    return model, tokenizer, image_processor
