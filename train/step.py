"""One optimizer step: a window of micro-batches, one normalised backward each, one optimizer step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from train.build import Stage


@dataclass
class StepResult:
    """What one optimizer step measured (host values, fetched with one device sync)."""

    loss: float
    grad_norm: float
    n_target: int
    n_tokens: int
    n_samples: int
    seen: list[tuple[str, str | None]]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to the device without blocking (pinned by the loader on GPU); host counts stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(stage: Stage, batches: list[dict[str, Any]]) -> StepResult:
    """Forward/backward over the accumulation window through accelerate's accumulation API, then step.

    Every backend (DDP, FSDP, DeepSpeed) steps once per window: accelerate skips gradient sync and the
    optimizer on all micro-batches but the last, and DeepSpeed's engine steps only at that boundary.
    The loss is divided by the window's answer-token count summed over ranks, so accumulation and data
    parallelism equal one big batch; accelerate divides by the accumulation steps, which is undone here.
    """
    acc, model, world = stage.accelerator, stage.model, stage.accelerator.num_processes
    local_target = sum(b["n_target"] for b in batches)
    n_target = acc.reduce(torch.tensor(float(local_target), device=acc.device), "sum")  # no host sync
    scale = world * acc.gradient_accumulation_steps / n_target.clamp(min=1.0)
    loss_sum = torch.zeros((), device=acc.device)
    for batch in batches:
        batch = to_device(batch, acc.device)
        with acc.accumulate(model), acc.autocast():
            loss = model(batch["input_ids"], batch.get("pixel_values"), batch.get("attention_mask"), batch["labels"],
                         batch.get("position_ids"))
            acc.backward(loss * scale)
        loss_sum += loss.detach().float()
    grad_norm: Any = torch.zeros((), device=acc.device)
    if stage.cfg.grad_clip > 0 and acc.sync_gradients:
        grad_norm = acc.clip_grad_norm_(stage.trainable, stage.cfg.grad_clip)
    stage.optimizer.step()  # a no-op wrapper under DeepSpeed, whose engine stepped in backward
    stage.scheduler.step()
    stage.optimizer.zero_grad(set_to_none=True)
    # DeepSpeed may report no norm (None) or a float; fetch loss and norm together in one transfer.
    norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(
        float("nan") if grad_norm is None else float(grad_norm), device=acc.device)
    total_loss = acc.reduce(loss_sum, "sum")
    loss_value, norm_value, target_value = torch.stack(
        [total_loss.float(), norm.float().to(acc.device), n_target.float()]).tolist()
    return StepResult(loss_value / max(1.0, target_value), norm_value, int(target_value),
                      sum(b["n_tokens"] for b in batches), sum(b["n_samples"] for b in batches),
                      [s for b in batches for s in b["seen"]])
