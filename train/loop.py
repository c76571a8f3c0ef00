"""One training loop for both stages: AdamW, cosine+warmup, accumulation, clipping, checkpoints, resume."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from model.errors import TrainError
from model.export import export
from model.llava import IGNORE, LlavaLite, build_model
from train.config import RunConfig, StageConfig, config_to_dict
from train.data import Collator, ConversationEncoder, MicroBatches, prepare, read_records

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a finished (or stopped) stage produced."""

    stage_dir: Path
    steps: int
    last_loss: float
    export_dir: Path | None
    report: dict[str, Any]


def stage_dir(cfg: RunConfig, stage: int) -> Path:
    """Where a stage writes metrics and checkpoints."""
    return Path(cfg.output_dir) / f"stage{stage}"


def final_dir(cfg: RunConfig, stage: int) -> Path:
    """Exported model of a stage: stage 2's is the run's `final/`."""
    return Path(cfg.output_dir) / "final" if stage == 2 else stage_dir(cfg, 1) / "final"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tower_cache(cfg: RunConfig) -> Path | None:
    """A random tower (smoke runs) is saved once per run dir so both stages and exports share it."""
    return None if cfg.model.vision_tower else Path(cfg.output_dir) / "random-vision-tower"


def default_init_projector(cfg: RunConfig, stage: int) -> str | None:
    """Stage 2 starts from stage 1's projector unless the config says otherwise."""
    st = cfg.stage(stage)
    if st.init_projector is not None:
        return st.init_projector or None
    if stage == 2:
        return str(stage_dir(cfg, 1) / "projector.safetensors")
    return None


def setup_model(cfg: RunConfig, stage: int, init_projector: bool = True) -> tuple[LlavaLite, Any, Any]:
    """Build the model for a stage and mark what trains (the projector is overwritten later on export/resume)."""
    st = cfg.stage(stage)
    model, tokenizer, image_processor = build_model(cfg.model, tower_cache(cfg), cfg.seed)
    init = default_init_projector(cfg, stage) if init_projector else None
    if init:
        if not Path(init).is_file():
            raise TrainError(f"projector weights '{init}' not found", "run stage 1 first, or set stage2.init_projector=''")
        model.projector.load_state_dict(load_file(init))
        log.info("projector initialised from %s", init)
    model.llm.requires_grad_(False)
    if st.train_llm and st.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        model.llm = get_peft_model(
            model.llm,
            PeftLoraConfig(r=st.lora.r, lora_alpha=st.lora.alpha, lora_dropout=st.lora.dropout,
                           target_modules=list(st.lora.target_modules), task_type="CAUSAL_LM"),
        )
    elif st.train_llm:
        model.llm.requires_grad_(True)
    model.projector.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, image_processor


def build_optimizer(model: LlavaLite, st: StageConfig) -> torch.optim.AdamW:
    """AdamW with its own projector LR; no weight decay on biases and norms."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "projector" if name.startswith("projector.") else "llm"
        groups.setdefault((part, p.ndim >= 2), []).append(p)
    params = []
    for (part, decay), ps in sorted(groups.items()):
        lr = (st.projector_lr or st.lr) if part == "projector" else st.lr
        params.append({"params": ps, "lr": lr, "weight_decay": st.weight_decay if decay else 0.0, "name": part})
    return torch.optim.AdamW(params, betas=(0.9, 0.999), eps=1e-8)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def save_checkpoint(path: Path, accelerator: Any, weights: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
                    step: int, keep: int) -> None:
    """Trainable weights + per-rank optimiser/scheduler/RNG state: all that resume needs (frozen weights are rebuilt).

    Optimiser state is saved per rank (each rank's shard under FSDP), so resume needs the same world size.
    """
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
               tmp / f"state-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # atomic: a crash mid-save never leaves a half checkpoint that --resume would pick
        ckpts = sorted(path.parent.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_checkpoint(directory: Path) -> Path | None:
    """Newest complete checkpoint in a stage dir."""
    ckpts = sorted(directory.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
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


def plot_loss(metrics_path: Path, out_png: Path, title: str) -> None:
    """Loss (and LR) curve from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.5, label="lr")
    ax2.set_ylabel("lr")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def train_stage(
    cfg: RunConfig,
    stage: int,
    resume: bool = False,
    stop_after: int | None = None,
    do_export: bool = True,
) -> StageResult:
    """Run one stage end to end; `stop_after` stops early (as an interruption would) for resume tests."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    st = cfg.stage(stage)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision), cpu=not torch.cuda.is_available())
    out = stage_dir(cfg, stage)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model, tokenizer, image_processor = setup_model(cfg, stage)

    records = read_records(st.data)
    encoder = ConversationEncoder(tokenizer)
    samples, report = prepare(records, encoder, st.image_folder, model.image_token_id, cfg.model.image_token,
                              model.num_image_tokens, st.max_length)
    log.info("stage %d data: %s", stage, json.dumps(report.as_dict()))
    if report.kept < report.total:
        log.warning("stage %d: %d of %d samples left out (see data_report.json)", stage, report.total - report.kept,
                    report.total)
    collate = Collator(image_processor, model.image_token_id, model.num_image_tokens, tokenizer.pad_token_id)
    lengths = [s.length for s in samples]

    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = len(samples) // (st.batch_size * world) // st.grad_accum
    if per_epoch == 0:
        raise TrainError(f"{len(samples)} samples are fewer than one optimizer step "
                         f"(batch {st.batch_size} x accum {st.grad_accum} x {world} GPUs)",
                         "lower batch_size/grad_accum or add data")
    total = st.max_steps or per_epoch * st.epochs

    optimizer = build_optimizer(model, st)
    scheduler = cosine_with_warmup(optimizer, total, max(1, round(st.warmup_ratio * total)))
    start = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise TrainError(f"no checkpoint to resume in {out}", "drop --resume or set save_every > 0")
        start = load_trainable(model, ckpt)
        saved_world = json.loads((ckpt / "meta.json").read_text()).get("world_size", 1)
        if saved_world != world:
            raise TrainError(f"{ckpt} was written by {saved_world} processes, this run has {world}",
                             f"resume with {saved_world} processes, or --export it and start a new stage")
        state = torch.load(ckpt / f"state-rank{rank}.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", ckpt, start)
        if accelerator.is_main_process and (out / "metrics.jsonl").exists():
            # Steps logged after the checkpoint will be redone: drop them so the curve has no duplicates.
            rows = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            kept = [ln for ln in rows if json.loads(ln)["step"] <= start]
            (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
    elif accelerator.is_main_process:
        (out / "metrics.jsonl").write_text("")
        for stale in out.glob("checkpoint-*"):  # a fresh run must never resume into an older run's state
            shutil.rmtree(stale, ignore_errors=True)
    if accelerator.is_main_process:
        (out / "data_report.json").write_text(json.dumps(report.as_dict(), indent=2))
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    model, optimizer = accelerator.prepare(model, optimizer)
    sampler = MicroBatches(lengths, st.batch_size, cfg.seed, cfg.group_by_length, world, rank,
                           per_epoch * st.grad_accum, start * st.grad_accum, total * st.grad_accum)
    loader = iter(DataLoader(samples, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                             pin_memory=accelerator.device.type == "cuda"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    metrics_f = (out / "metrics.jsonl").open("a") if accelerator.is_main_process else None
    bar = tqdm(total=total, initial=start, desc=f"stage {stage}", disable=not accelerator.is_main_process)
    last_loss = float("nan")
    step = start
    try:
        for step in range(start + 1, total + 1):
            t0 = time.perf_counter()
            batches = [next(loader) for _ in range(st.grad_accum)]
            # Normalise by the window's answer-token count so accumulation equals one big batch.
            local_target = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            n_target = int(accelerator.reduce(torch.tensor(local_target, device=accelerator.device), "sum"))
            loss_sum = torch.zeros((), device=accelerator.device)
            for a, batch in enumerate(batches):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = a == len(batches) - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                    loss = model(batch["input_ids"], batch.get("pixel_values"), batch["attention_mask"], batch["labels"])
                    # DDP averages gradients over ranks, so scale by world to get sum(token losses) / all tokens.
                    accelerator.backward(loss * world / n_target)
                loss_sum += loss.detach().float()
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            last_loss = float(accelerator.reduce(loss_sum, "sum")) / n_target
            n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            n_samples = sum(b["input_ids"].shape[0] for b in batches)
            row = {"step": step, "loss": round(last_loss, 6), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": round(float(grad_norm), 6), "tokens_per_s": round(n_tokens * world / dt, 2),
                   "samples_per_s": round(n_samples * world / dt, 3), "answer_tokens": n_target}
            if metrics_f is not None and (step % cfg.log_every == 0 or step == total):
                metrics_f.write(json.dumps(row) + "\n")
                metrics_f.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                weights = full_trainable_state(accelerator, model, trainable_names)
                save_checkpoint(out / f"checkpoint-{step}", accelerator, weights, optimizer, scheduler, step,
                                cfg.keep_checkpoints)
            if stop_after is not None and step >= stop_after:
                break
    finally:
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
    accelerator.wait_for_everyone()
    export_dir = None
    if accelerator.is_main_process:
        plot_loss(out / "metrics.jsonl", out / "loss.png", f"{cfg.name} stage {stage}")
    if step >= total:
        weights = full_trainable_state(accelerator, model, trainable_names)
        save_checkpoint(out / f"checkpoint-{step}", accelerator, weights, optimizer, scheduler, step,
                        cfg.keep_checkpoints)
        if accelerator.is_main_process:
            proj = {k[len("projector."):]: v.contiguous() for k, v in weights.items() if k.startswith("projector.")}
            save_file(proj, str(out / "projector.safetensors"))
            if do_export:
                raw = accelerator.unwrap_model(model)
                if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
                    raw = setup_model(cfg, stage, init_projector=False)[0]  # sharded params cannot be exported: rebuild and load full ones
                    load_weights(raw, weights)
                export_dir = export(raw, tokenizer, image_processor, cfg.model.projector, final_dir(cfg, stage),
                                    cfg.model.image_token)
    accelerator.wait_for_everyone()
    return StageResult(out, step, last_loss, export_dir, report.as_dict())


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
    return export(model, tokenizer, image_processor, cfg.model.projector, target, cfg.model.image_token)
