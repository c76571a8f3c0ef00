"""Checkpoints: trainable weights + per-rank optimiser/scheduler/RNG state, written atomically; resume."""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.errors import TrainError
from model.llava import LlavaLite
from train.config import StageConfig

log = logging.getLogger(__name__)


class StageLike(Protocol):
    """What checkpointing reads of a built stage (train.build.Stage): declared here so the two modules
    do not import each other."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    cfg: StageConfig
    out: Path
    trainable_names: list[str]


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_trainable_state(accelerator: Any, model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Trainable weights gathered to full tensors (FSDP/ZeRO shards included); call on every rank."""
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        full = accelerator.get_state_dict(model)
        return {k: full[k].detach().cpu().clone() for k in names} if accelerator.is_main_process else {}
    return accelerator.unwrap_model(model).trainable_state_dict()


def save_checkpoint(stage: StageLike, step: int, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint-<step>; frozen weights are rebuilt on resume, so they are not saved.

    Optimiser state is saved per rank (each rank's shard under FSDP), so resume needs the same world size.
    """
    acc = stage.accelerator
    if weights is None:
        weights = full_trainable_state(acc, stage.model, stage.trainable_names)
    path = stage.out / f"checkpoint-{step}"
    tmp = path.with_name(path.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": acc.num_processes}))
    acc.wait_for_everyone()
    torch.save({"optimizer": stage.optimizer.state_dict(), "scheduler": stage.scheduler.state_dict(),
                "rng": _rng_state()}, tmp / f"state-rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # atomic: a crash mid-save never leaves a half checkpoint that --resume would pick
        keep = stage.cfg.keep_checkpoints
        for old in list_checkpoints(stage.out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints of a stage dir, oldest first."""
    return sorted(directory.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(directory: Path) -> Path | None:
    """Newest complete checkpoint in a stage dir."""
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def load_weights(model: LlavaLite, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy trainable weights into a model set up for the same stage, refusing any mismatch."""
    params = dict(model.named_parameters())
    missing = [k for k, p in params.items() if p.requires_grad and k not in state]
    unexpected = [k for k in state if k not in params]
    if missing or unexpected:
        raise TrainError(f"{source} does not match this stage's trainable weights",
                         "resume/export with the same config and stage that wrote it")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def load_trainable(model: LlavaLite, ckpt: Path) -> int:
    """Load a checkpoint's trainable weights; return its step."""
    load_weights(model, load_file(str(ckpt / "trainable.safetensors")), f"checkpoint {ckpt}")
    return int(json.loads((ckpt / "meta.json").read_text())["step"])


def resume_state(accelerator: Any, model: LlavaLite, optimizer: Any, scheduler: Any, directory: Path) -> int:
    """Load the newest checkpoint (weights, optimiser, schedule, RNG) before accelerate wraps anything."""
    ckpt = latest_checkpoint(directory)
    if ckpt is None:
        raise TrainError(f"no checkpoint to resume in {directory}", "drop --resume or set save_every > 0")
    saved_world = json.loads((ckpt / "meta.json").read_text()).get("world_size", 1)
    if saved_world != accelerator.num_processes:
        raise TrainError(f"{ckpt} was written by {saved_world} processes, this run has {accelerator.num_processes}",
                         f"resume with {saved_world} processes, or --export it and start a new stage")
    start = load_trainable(model, ckpt)
    state = torch.load(ckpt / f"state-rank{accelerator.process_index}.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    log.info("resumed from %s (step %d)", ckpt, start)
    return start


def start_metrics(stage: StageLike, resumed_at: int | None) -> None:
    """Fresh run: empty metrics and no stale checkpoints. Resume: drop rows past the checkpoint (redone)."""
    if not stage.accelerator.is_main_process:
        return
    metrics = stage.out / "metrics.jsonl"
    if resumed_at is None:
        metrics.write_text("")
        for stale in stage.out.glob("checkpoint-*"):  # a fresh run must never resume into an older run's state
            shutil.rmtree(stale, ignore_errors=True)
    elif metrics.exists():
        rows = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        metrics.write_text("".join(ln + "\n" for ln in rows if json.loads(ln)["step"] <= resumed_at))
