"""End of a stage: loss curve, how much the loss fell, caption conditioning (stage 1), export."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from model.export import export
from model.llava import IGNORE, LlavaLite, torch_dtype
from train.build import Stage, final_dir, setup_model
from train.checkpoint import load_weights

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_loss(metrics_path: Path, out_png: Path, title: str) -> None:
    """Loss (and LR) curve from metrics.jsonl."""
    import matplotlib  # start-up speed: only the end of a stage plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return
    fig = loss_figure(rows, title)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def loss_figure(rows: list[dict[str, Any]], title: str):
    """The loss curve on the left axis, the learning rate on the right, one legend naming both."""
    import matplotlib.pyplot as plt  # start-up speed: only the end of a stage plots

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    (loss_line,) = ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title(title)
    ax2 = ax.twinx()
    (lr_line,) = ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.5, label="learning rate (right axis)")
    ax2.set_ylabel("learning rate")
    # Two axes, two artists lists: one legend with both, drawn on the top axis so the lr line does not cover it.
    ax2.legend([loss_line, lr_line], [loss_line.get_label(), lr_line.get_label()], loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def loss_fall(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean loss of the first and last quarter of steps, and how much lower the last is (fraction)."""
    losses = [r["loss"] for r in rows]
    if len(losses) < 4:
        return None
    q = len(losses) // 4
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    return {"first_quarter": round(first, 4), "last_quarter": round(last, 4), "fall": round(1 - last / first, 4)}


@torch.no_grad()
def caption_conditioning(stage: Stage, n: int = 32) -> dict[str, float] | None:
    """Mean caption loss per token with the image, with another sample's image, and with no image tokens.

    Lower with the right image than without shows the projector carries what the image holds; the
    mismatched image separates that from a learned prompt that helps any caption.
    """
    model: LlavaLite = stage.raw_model
    collate = stage.collator
    items = []
    for i in range(len(stage.dataset)):
        enc = stage.dataset[i]
        if enc.pixels is not None and enc.ids:
            items.append(enc)
        if len(items) == n:
            break
    if len(items) < 2:
        return None
    was_training = model.training
    model.eval()
    device = stage.accelerator.device
    sums = {"with_image": 0.0, "mismatched_image": 0.0, "no_image": 0.0}
    tokens = 0
    for k, enc in enumerate(items):
        other = items[(k + 1) % len(items)]
        ids, labels = collate.expand(enc.ids, enc.labels)
        ids_t, labels_t = torch.tensor([ids], device=device), torch.tensor([labels], device=device)
        with stage.accelerator.autocast():
            sums["with_image"] += float(model(ids_t, enc.pixels[None].to(device), None, labels_t))
            sums["mismatched_image"] += float(model(ids_t, other.pixels[None].to(device), None, labels_t))
            keep = [j for j, t in enumerate(enc.ids) if t != model.image_token_id]
            plain_ids = torch.tensor([[enc.ids[j] for j in keep]], device=device)
            plain_labels = torch.tensor([[enc.labels[j] for j in keep]], device=device)
            sums["no_image"] += float(model(plain_ids, None, None, plain_labels))
        tokens += sum(lab != IGNORE for lab in labels[1:])
    model.train(was_training)
    out = {k: round(v / tokens, 4) for k, v in sums.items()}
    out["samples"] = len(items)
    return out


def export_dtype(stage: Stage) -> torch.dtype | None:
    """The exported weights' dtype: the training compute dtype unless the config names one."""
    if stage.cfg.export_dtype != "auto":
        return torch_dtype(stage.cfg.export_dtype)
    return torch.bfloat16 if stage.accelerator.mixed_precision == "bf16" else None


def export_stage(stage: Stage, weights: dict[str, torch.Tensor]) -> Path:
    """Write the stage's LlavaForConditionalGeneration checkpoint (main process only)."""
    cfg, acc = stage.cfg, stage.accelerator
    raw = stage.raw_model
    if acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raw = setup_model(cfg, stage.number, init_projector=False)[0]  # sharded params cannot be exported: rebuild
        load_weights(raw, weights)
    return export(raw, stage.tokenizer, stage.image_processor, cfg.model.projector, final_dir(cfg, stage.number),
                  cfg.model.image_token, dtype=export_dtype(stage))
