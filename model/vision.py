"""Frozen vision tower: any transformers CLIP/SigLIP vision model, features from one hidden layer."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PretrainedConfig
from transformers.image_processing_utils import BaseImageProcessor

from model.errors import TrainError

log = logging.getLogger(__name__)

# Towers whose sequence starts with a CLS token that LLaVA drops; SigLIP has none.
_CLS_TOWERS = {"clip_vision_model", "clip"}
# Towers run layer by layer up to the feature layer (embeddings, optional pre-norm, encoder layers); others
# (SigLIP2's patch inputs) go through the model's own forward and keep its hidden states.
_LAYERWISE = {"clip_vision_model", "clip", "siglip_vision_model", "siglip"}
_SUPPORTED = {"clip_vision_model", "clip", "siglip_vision_model", "siglip", "siglip2_vision_model", "siglip2"}


def _load_vision_model(name_or_path: str, attn_implementation: str | None = None) -> nn.Module:
    """Load only the vision half of a CLIP/SigLIP checkpoint (full dual-encoder or vision-only)."""
    import transformers  # the class is picked by name below

    cfg = AutoConfig.from_pretrained(name_or_path)
    vision_cls = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipVisionModel",
                  "siglip_vision_model": "SiglipVisionModel", "siglip2": "Siglip2VisionModel",
                  "siglip2_vision_model": "Siglip2VisionModel"}.get(cfg.model_type)
    if vision_cls is None:
        raise TrainError(f"'{name_or_path}' is a {cfg.model_type} model, not a CLIP/SigLIP vision tower",
                         "set model.vision_tower to a CLIP or SigLIP checkpoint")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return getattr(transformers, vision_cls).from_pretrained(name_or_path, **kwargs)


class VisionTower(nn.Module):
    """Frozen image encoder returning patch features of a selected layer (CLS dropped for CLIP)."""

    def __init__(self, model: nn.Module, feature_layer: int = -2) -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        cfg = model.config
        self.model_type: str = cfg.model_type
        if self.model_type not in _SUPPORTED:
            raise TrainError(
                f"vision tower type '{self.model_type}' is not supported",
                "use a CLIP or SigLIP vision model (hub id or local path)",
            )
        self.has_cls = self.model_type in _CLS_TOWERS
        self.image_size: int = int(cfg.image_size)
        self.patch_size: int = int(cfg.patch_size)
        self.hidden_size: int = int(cfg.hidden_size)
        n_layers = int(cfg.num_hidden_layers)
        # hidden_states[k] is the output of layer k (0 = embeddings): layer -2 needs only the first L-1 layers.
        self.layers_needed = feature_layer % (n_layers + 1)
        self.requires_grad_(False)
        self.model.eval()

    @property
    def num_patches(self) -> int:
        """Number of image tokens the tower yields per image (the `<image>` expansion length)."""
        return (self.image_size // self.patch_size) ** 2

    def train(self, mode: bool = True) -> "VisionTower":
        """Keep the frozen tower in eval mode whatever the parent does (no dropout drift)."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images (B,3,H,W) to patch features (B, num_patches, hidden)."""
        pixel_values = pixel_values.to(self.model.dtype)
        vision = getattr(self.model, "vision_model", None)
        if self.model_type in _LAYERWISE and vision is not None:
            # Stop at the feature layer: the layers above it (and the post-norm/head) would be wasted work,
            # and no list of every hidden state is kept.
            feats = vision.embeddings(pixel_values)
            if hasattr(vision, "pre_layrnorm"):
                feats = vision.pre_layrnorm(feats)
            for layer in vision.encoder.layers[: self.layers_needed]:
                feats = layer(feats, None)
        else:
            feats = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        return feats[:, 1:] if self.has_cls else feats


def build_vision_tower(
    name_or_path: str | None,
    vision_config: dict[str, Any] | None,
    feature_layer: int,
    cache_dir: Path | None,
    seed: int,
    attn_implementation: str | None = None,
) -> VisionTower:
    """Load a tower by hub id/local path, or build a seeded random one from a config dict (smoke runs)."""
    if name_or_path:
        if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
            raise TrainError(f"vision tower path '{name_or_path}' does not exist", "check model.vision_tower")
        try:
            model = _load_vision_model(name_or_path, attn_implementation)
        except (OSError, ValueError) as exc:
            raise TrainError(
                f"could not load vision tower '{name_or_path}' ({type(exc).__name__})",
                "check the hub id or local path (offline machines need a local copy)",
            ) from exc
        return VisionTower(model, feature_layer)
    if not vision_config:
        raise TrainError("no vision tower configured", "set model.vision_tower or model.vision_config")
    # A random tower must be identical across stages and exports: build once, then reuse the saved copy.
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if cache_dir is not None and (cache_dir / "config.json").exists():
        log.warning("using the RANDOM vision tower saved at %s (smoke run; no real image understanding)", cache_dir)
        return VisionTower(AutoModel.from_pretrained(str(cache_dir), **attn), feature_layer)
    cfg_dict = dict(vision_config)
    model_type = cfg_dict.pop("model_type", "clip_vision_model")
    cfg: PretrainedConfig = AutoConfig.for_model(model_type, **cfg_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(cfg, **attn)
    log.warning("built a RANDOM %s vision tower from config (smoke run; no real image understanding)", model_type)
    # Every rank builds the same seeded weights; only rank 0 writes, via rename so no reader sees half a folder.
    if cache_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
        model.save_pretrained(str(tmp))
        if not (cache_dir / "config.json").exists():
            tmp.rename(cache_dir)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return VisionTower(model, feature_layer)


def build_image_processor(
    name_or_path: str | None, tower: VisionTower, pad_to_square: bool
) -> BaseImageProcessor:
    """The tower's own image processor; with pad-to-square, a LlavaImageProcessor doing the same resize.

    LlavaImageProcessor pads with the mean colour before resizing (LLaVA's pad-to-square), and it is
    what the exported checkpoint ships, so training and inference preprocess identically.
    """
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    base: BaseImageProcessor | None = None
    if name_or_path:
        try:
            base = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise TrainError(
                f"could not load the image processor of '{name_or_path}'", "check model.vision_tower"
            ) from exc
    size = tower.image_size
    mean = list(getattr(base, "image_mean", None) or CLIPImageProcessor().image_mean)
    std = list(getattr(base, "image_std", None) or CLIPImageProcessor().image_std)
    if base is not None and not pad_to_square:
        return base
    if tower.has_cls:
        kw: dict[str, Any] = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:  # SigLIP resizes straight to a square; after padding, crop is a no-op anyway
        kw = dict(size={"height": size, "width": size}, do_center_crop=False)
    return LlavaImageProcessor(image_mean=mean, image_std=std, do_pad=pad_to_square, **kw)
