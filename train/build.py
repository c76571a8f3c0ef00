"""Building a stage: accelerator, model with what trains, data, optimiser and schedule."""
from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from model.errors import TrainError
from model.llava import LlavaLite, build_model, enable_activation_checkpointing, resolve_frozen_dtype
from train.config import RunConfig, StageConfig, config_to_dict
from train.data import (Collator, LazyDataset, MicroBatches, SampleSpec, check_records, estimate_length, make_encoder,
                        read_records)
from train.checkpoint import resume_state
from train.images import ImageTransform

log = logging.getLogger(__name__)


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
    """Build the model for a stage and mark what trains; frozen parts take the frozen dtype (bf16 on GPU)."""
    st = cfg.stage(stage)
    # Stage 1 resizes and centre-crops (LLaVA-1.5's pretrain), stage 2 pads to square: the exported
    # processor does what the stage trained on.
    model, tokenizer, image_processor = build_model(cfg.model, tower_cache(cfg), cfg.seed, st.image_mode == "pad")
    model.loss_chunk = cfg.loss_chunk
    init = default_init_projector(cfg, stage) if init_projector else None
    if init:
        if not Path(init).is_file():
            raise TrainError(f"projector weights '{init}' not found", "run stage 1 first, or set stage2.init_projector=''")
        model.projector.load_state_dict(load_file(init))
        log.info("projector initialised from %s", init)
    model.llm.requires_grad_(False)
    if st.train_llm and st.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model  # optional heavy import, stage-2 LoRA only

        model.llm = get_peft_model(
            model.llm,
            PeftLoraConfig(r=st.lora.r, lora_alpha=st.lora.alpha, lora_dropout=st.lora.dropout,
                           target_modules=list(st.lora.target_modules), task_type="CAUSAL_LM"),
        )
    elif st.train_llm:
        model.llm.requires_grad_(True)
    else:
        model.llm.to(resolve_frozen_dtype(cfg.model))  # a frozen LLM needs no fp32 master copy
    model.projector.requires_grad_(True)
    if cfg.gradient_checkpointing and st.train_llm:
        enable_activation_checkpointing(model.llm)
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
    fused = torch.cuda.is_available() and all(p.is_cuda for g in params for p in g["params"])
    return torch.optim.AdamW(params, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Schedule:
    """How many optimizer steps a stage takes and how many of them warm up, with the reason."""

    per_epoch: int
    total: int
    warmup: int
    why: str


def plan_schedule(n_samples: int, st: StageConfig, world: int) -> Schedule:
    """Steps = max_steps, else max(epochs x steps per epoch, min_steps); warm-up = max(ratio x steps, floor)."""
    per_epoch = n_samples // (st.batch_size * world) // st.grad_accum
    if per_epoch == 0:
        raise TrainError(f"{n_samples} samples are fewer than one optimizer step "
                         f"(batch {st.batch_size} x accum {st.grad_accum} x {world} processes)",
                         "lower batch_size/grad_accum or add data")
    if st.max_steps:
        total, why = st.max_steps, f"max_steps {st.max_steps}"
    elif per_epoch * st.epochs < st.min_steps:
        total = st.min_steps
        why = (f"min_steps {st.min_steps} (the data gives only {per_epoch * st.epochs}: "
               f"{total / per_epoch:.1f} passes over {n_samples} samples)")
    else:
        total, why = per_epoch * st.epochs, f"{st.epochs} epoch(s) of {per_epoch}"
    by_ratio = round(st.warmup_ratio * total)
    warmup = min(total, max(1, by_ratio, st.min_warmup_steps))
    how = f"warmup_ratio {st.warmup_ratio} gives {by_ratio}" + (
        f", raised to min_warmup_steps {st.min_warmup_steps}" if st.min_warmup_steps > by_ratio else "")
    return Schedule(per_epoch, total, warmup, f"{total} optimizer steps ({why}); {warmup} warm-up steps ({how})")


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(cfg: RunConfig, st: StageConfig, out: Path) -> Any:
    """The stage's Accelerator: mixed precision, accumulation (every backend steps once per window), trackers."""
    from accelerate import Accelerator  # start-up speed: accelerate pulls in much of the ecosystem

    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log_with = None if cfg.report_to == "none" else cfg.report_to
    try:
        accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision),
                                  cpu=not torch.cuda.is_available(), gradient_accumulation_steps=st.grad_accum,
                                  log_with=log_with, project_dir=str(out))
    except (ImportError, ValueError) as exc:
        raise TrainError(f"cannot start the '{cfg.report_to}' tracker ({exc})",
                         f"pip install {cfg.report_to}, or set report_to: none") from exc
    # The accumulation state is process-wide: a second stage in the same process sets its own.
    accelerator.gradient_accumulation_steps = st.grad_accum
    return accelerator


@dataclass
class Stage:
    """Everything one stage trains with, built and prepared."""

    cfg: RunConfig
    number: int
    st: StageConfig
    out: Path
    accelerator: Any
    model: Any  # prepared (DDP/FSDP/DeepSpeed-wrapped) LlavaLite
    tokenizer: Any
    image_processor: Any
    dataset: LazyDataset
    lengths: list[int]
    collator: Collator
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Schedule
    trainable_names: list[str]
    start_step: int  # optimizer steps already done (a resumed run)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        """Parameters that train, as the prepared model holds them."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def raw_model(self) -> LlavaLite:
        """The unwrapped LlavaLite."""
        return self.accelerator.unwrap_model(self.model)


def default_workers(configured: int) -> int:
    """Data-loader workers: the configured count, capped by the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(configured, cpus - 1))


def build_stage(cfg: RunConfig, stage: int, resume: bool = False) -> Stage:
    """Model, data, optimiser and schedule of one stage, prepared by accelerate; with resume, at its checkpoint."""
    st = cfg.stage(stage)
    out = stage_dir(cfg, stage)
    accelerator = make_accelerator(cfg, st, out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model, tokenizer, image_processor = setup_model(cfg, stage)
    records = read_records(st.data)[: st.limit] if st.limit else read_records(st.data)
    spec = SampleSpec(make_encoder(st.template, tokenizer, cfg.model.image_token), Path(st.image_folder),
                      model.image_token_id, cfg.model.image_token, model.num_image_tokens, st.max_length,
                      st.image_position)
    check_records(records, spec)
    dataset = LazyDataset(records, spec, ImageTransform.from_processor(image_processor))
    lengths = [estimate_length(r, model.num_image_tokens) for r in records]
    collator = Collator(model.image_token_id, model.num_image_tokens, tokenizer.pad_token_id, pack=cfg.packing)
    schedule = plan_schedule(len(records), st, accelerator.num_processes)
    log.info("stage %d: %d records, template %s, images %s; %s", stage, len(records), st.template, st.image_mode,
             schedule.why)
    optimizer = build_optimizer(model, st)
    scheduler = cosine_with_warmup(optimizer, schedule.total, schedule.warmup)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    # Resume before accelerate wraps (and FSDP shards) the model and optimiser.
    start = resume_state(accelerator, model, optimizer, scheduler, out) if resume else 0
    if cfg.compile:
        model.llm = torch.compile(model.llm, dynamic=True)
    if accelerator.distributed_type.name == "DEEPSPEED":
        # No data loader goes through prepare(): DeepSpeed learns the micro-batch size and clipping here.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = st.batch_size
        ds["gradient_clipping"] = cfg.grad_clip
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.gradient_accumulation_steps != st.grad_accum:
        raise TrainError(f"the accelerate config sets gradient accumulation {accelerator.gradient_accumulation_steps}, "
                         f"stage{stage}.grad_accum is {st.grad_accum}",
                         "remove gradient_accumulation_steps from the accelerate/DeepSpeed config (the run config sets it)")
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(json.dumps(config_to_dict(cfg), indent=2))
    if cfg.report_to != "none":
        accelerator.init_trackers(f"{cfg.name}-stage{stage}", config=_flat(config_to_dict(cfg)))
    return Stage(cfg, stage, st, out, accelerator, model, tokenizer, image_processor, dataset, lengths, collator,
                 optimizer, scheduler, schedule, trainable_names, start)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Trackers take flat scalar configs."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def micro_batches(stage: Stage, start_step: int) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches from optimizer step `start_step` on, encoded and decoded in worker processes."""
    acc, st, cfg = stage.accelerator, stage.st, stage.cfg
    sched = stage.schedule
    sampler = MicroBatches(stage.lengths, st.batch_size, cfg.seed, cfg.group_by_length and not cfg.packing,
                           acc.num_processes, acc.process_index, sched.per_epoch * st.grad_accum,
                           start_step * st.grad_accum, sched.total * st.grad_accum)
    workers = default_workers(cfg.num_workers)
    loader = DataLoader(stage.dataset, batch_sampler=sampler, collate_fn=stage.collator, num_workers=workers,
                        pin_memory=acc.device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers else None)
    return iter(loader)
