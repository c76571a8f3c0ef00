"""Vision-to-language projector: `linear` (LLaVA) or `mlp2x_gelu` (LLaVA-1.5)."""
from __future__ import annotations

from torch import nn

from model.errors import TrainError

PROJECTORS = ("linear", "mlp2x_gelu")


def build_projector(kind: str, vision_hidden: int, text_hidden: int) -> nn.Module:
    """Build the projector; module names (linear_1, act, linear_2) mirror the export target."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(vision_hidden, text_hidden))
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden))
    raise TrainError(f"unknown projector '{kind}'", f"use one of: {', '.join(PROJECTORS)}")
