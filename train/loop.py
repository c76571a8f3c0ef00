"""The training loop both stages share: build, step, checkpoint, finish (each in its own module)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from model.errors import TrainError
from model.export import export
from model.llava import torch_dtype
from train.build import Stage, build_stage, micro_batches, setup_model, stage_dir
from train.checkpoint import full_trainable_state, latest_checkpoint, load_trainable, save_checkpoint, start_metrics
from train.config import RunConfig
from train.data import DataReport
from train.finish import caption_conditioning, export_stage, loss_fall, plot_loss, read_metrics
from train.step import StepResult, train_step

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a finished stage produced."""

    stage_dir: Path
    steps: int
    last_loss: float
    export_dir: Path | None
    report: dict[str, Any]
    loss_fall: dict[str, float] | None = None
    conditioning: dict[str, float] | None = None


def metrics_row(stage: Stage, step: int, res: StepResult, seconds: float) -> dict[str, Any]:
    """One metrics.jsonl row."""
    world = stage.accelerator.num_processes
    return {"step": step, "loss": round(res.loss, 6), "lr": stage.scheduler.get_last_lr()[0],
            "grad_norm": round(res.grad_norm, 6), "tokens_per_s": round(res.n_tokens * world / seconds, 2),
            "samples_per_s": round(res.n_samples * world / seconds, 3), "answer_tokens": res.n_target}


def run_steps(stage: Stage, seen: dict[str, str | None]) -> tuple[int, float]:
    """Optimizer steps from the stage's start to its end; returns (last step, last loss)."""
    from tqdm.auto import tqdm  # start-up speed

    acc, cfg, total = stage.accelerator, stage.cfg, stage.schedule.total
    batches = micro_batches(stage, stage.start_step)
    metrics_f = (stage.out / "metrics.jsonl").open("a") if acc.is_main_process else None
    bar = tqdm(total=total, initial=stage.start_step, desc=f"stage {stage.number}", disable=not acc.is_main_process)
    step, last_loss = stage.start_step, float("nan")
    stage.model.train()
    try:
        for step in range(stage.start_step + 1, total + 1):
            t0 = time.perf_counter()
            res = train_step(stage, [next(batches) for _ in range(stage.st.grad_accum)])
            seen.update({sid: reason for sid, reason in res.seen})
            last_loss = res.loss
            row = metrics_row(stage, step, res, time.perf_counter() - t0)
            if step % cfg.log_every == 0 or step == total:
                if metrics_f is not None:
                    metrics_f.write(json.dumps(row) + "\n")
                    metrics_f.flush()
                if cfg.report_to != "none":
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_checkpoint(stage, step)
    finally:
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
    return step, last_loss


def data_report(stage: Stage, seen: dict[str, str | None]) -> DataReport:
    """What happened to the samples this run encoded, merged over ranks."""
    from accelerate.utils import gather_object  # start-up speed

    merged: dict[str, str | None] = {}
    for part in gather_object([seen]) if stage.accelerator.num_processes > 1 else [seen]:
        merged.update(part)
    report = DataReport()
    for sid, reason in merged.items():
        report.count(reason, sid)
    return report


def train_stage(cfg: RunConfig, stage: int, resume: bool = False, do_export: bool = True) -> StageResult:
    """Run one stage end to end: build, steps with checkpoints, then the final checkpoint, summary and export."""
    st = build_stage(cfg, stage, resume)
    acc = st.accelerator
    start_metrics(st, st.start_step if resume else None)
    seen: dict[str, str | None] = {}
    step, last_loss = run_steps(st, seen)
    acc.wait_for_everyone()
    report = data_report(st, seen)
    if report.kept < report.total:
        log.warning("stage %d: %d of %d samples left out (see data_report.json)", stage, report.total - report.kept,
                    report.total)
    weights = full_trainable_state(acc, st.model, st.trainable_names)
    save_checkpoint(st, step, weights)
    result = StageResult(st.out, step, last_loss, None, report.as_dict())
    if acc.is_main_process:
        (st.out / "data_report.json").write_text(json.dumps(report.as_dict(), indent=2))
        plot_loss(st.out / "metrics.jsonl", st.out / "loss.png", f"{cfg.name} stage {stage}")
        result.loss_fall = loss_fall(read_metrics(st.out / "metrics.jsonl"))
        if stage == 1 and acc.distributed_type.name in ("NO", "MULTI_GPU", "MULTI_CPU"):
            result.conditioning = caption_conditioning(st)
        (st.out / "summary.json").write_text(json.dumps(
            {"steps": step, "backend": acc.distributed_type.name, "processes": acc.num_processes,
             "last_loss": last_loss, "loss_fall": result.loss_fall,
             "caption_loss": result.conditioning, "schedule": st.schedule.why}, indent=2))
        proj = {k[len("projector."):]: v.contiguous() for k, v in weights.items() if k.startswith("projector.")}
        save_file(proj, str(st.out / "projector.safetensors"))
        if do_export:
            result.export_dir = export_stage(st, weights)
    if cfg.report_to != "none":
        acc.end_training()
    acc.wait_for_everyone()
    return result


def export_checkpoint(cfg: RunConfig, stage: int, ckpt: Path | None, out_dir: Path | None) -> Path:
    """Rebuild a stage's model, load a checkpoint's trainable weights, and export it."""
    directory = stage_dir(cfg, stage)
    ckpt = ckpt or latest_checkpoint(directory)
    if ckpt is None or not (ckpt / "trainable.safetensors").is_file():
        raise TrainError(f"no checkpoint found at {ckpt or directory}", "pass --export PATH/TO/checkpoint-N")
    model, tokenizer, image_processor = setup_model(cfg, stage, init_projector=False)
    step = load_trainable(model, ckpt)
    target = out_dir or ckpt / "hf"
    log.info("exporting %s (step %d) to %s", ckpt, step, target)
    dtype = None if cfg.export_dtype == "auto" else torch_dtype(cfg.export_dtype)
    return export(model, tokenizer, image_processor, cfg.model.projector, target, cfg.model.image_token, dtype=dtype)
