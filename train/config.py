"""Typed run configuration: YAML files under train/configs/, overridable with `--set key=value`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datagen.inputs import load_yaml
from model.errors import TrainError, VisinstructError
from model.llava import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
ATTENTION = ("sdpa", "flash_attention_2", "eager")


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM (stage 2 option), through peft."""

    enabled: bool = False
    r: int = 128  # LLaVA-1.5's LoRA scripts: r=128, alpha=256
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


TEMPLATES = ("plain", "chat")
IMAGE_MODES = ("crop", "pad")
IMAGE_POSITIONS = ("first", "keep")


@dataclass
class StageConfig:
    """One training stage: data, what trains, optimiser and schedule."""

    data: list[str] = field(default_factory=list)
    image_folder: str = "."
    limit: int | None = None  # use only the first N records (smoke runs: a small fixed set, several epochs)
    train_llm: bool = False
    # LLaVA-1.5: stage 1 uses the `plain` template (image tokens, caption, end token) and resize +
    # centre crop; stage 2 the LLM's chat template and pad-to-square. The other value of each is an option.
    template: str = "chat"
    image_mode: str = "pad"
    # LLaVA's preprocess_multimodal moves `<image>` to the start of the first human turn; `keep` leaves it.
    image_position: str = "first"
    lora: LoraConfig = field(default_factory=LoraConfig)
    lr: float = 1e-3
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_warmup_steps: int = 0  # warm-up is max(this, round(warmup_ratio x steps)); the log says which
    min_steps: int = 0  # small sets: repeat epochs until at least this many optimizer steps
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    max_length: int = 2048
    init_projector: str | None = None


@dataclass
class RunConfig:
    """Everything a run needs."""

    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(template="plain", image_mode="crop"))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(train_llm=True, lr=2e-5))
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    group_by_length: bool = True  # unpacked path: batches of similar length (less padding)
    packing: bool = False  # several samples per row, no padding, no attention across samples
    pack_length: int | None = None  # tokens per packed row (default: the stage's max_length)
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (LLaVA-1.5 trains with --tf32 True)
    compile: bool = False  # torch.compile the LLM
    loss_chunk: int = 4096  # labelled positions per chunk of the LM head + cross-entropy (caps logits memory)
    export_dtype: str = "auto"  # auto = the training compute dtype (bf16 under bf16 mixed precision) | bfloat16 | float32 | float16
    report_to: str = "none"  # none | tensorboard | wandb | trackio (through accelerate's trackers)
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    num_workers: int = 4  # data-loader processes: encoding and image decoding happen there

    def stage(self, n: int) -> StageConfig:
        """Config of stage 1 or 2."""
        if n not in (1, 2):
            raise TrainError(f"unknown stage {n}", "use --stage 1 or --stage 2")
        return self.stage1 if n == 1 else self.stage2


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Recursively build a dataclass, rejecting unknown keys (typos fail loudly)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainError(f"config section '{where}' must be a mapping", "fix the YAML")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise TrainError(f"unknown config key(s) {sorted(unknown)} in '{where or 'top level'}'", f"valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        default = names[key].default_factory() if names[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            # Start from the field's own default (stage 1 and 2 differ), then apply the YAML's keys.
            base = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
            base = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in base.items()}
            if value is not None and not isinstance(value, dict):
                raise TrainError(f"config section '{where}.{key}' must be a mapping", "fix the YAML")
            value = _build(type(default), {**base, **(value or {})}, f"{where}.{key}".strip("."))
        kwargs[key] = value
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainError(f"cannot set '{dotted}'", "its parent is not a section")
    node[parts[-1]] = value


def resolve_config_path(name_or_path: str) -> Path:
    """Accept a path or a bare config name like `smoke-cpu`."""
    path = Path(name_or_path)
    if not path.exists() and (CONFIG_DIR / f"{name_or_path}.yaml").exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise TrainError(f"config '{name_or_path}' not found", f"pass a YAML path or one of: {known}")
    return path


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = resolve_config_path(name_or_path)
    try:
        tree = load_yaml(path, "training config", "fix the YAML") or {}
    except VisinstructError as exc:  # datagen's input layer: bad bytes, syntax or nesting, with file and line
        raise TrainError(exc.what, exc.hint) from None
    for item in overrides or []:
        if "=" not in item:
            raise TrainError(f"override '{item}' is not key=value", "e.g. --set stage2.lr=1e-5")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    cfg = _build(RunConfig, tree, "")
    for n in (1, 2):
        st = cfg.stage(n)
        for name in ("lr", "weight_decay", "warmup_ratio"):
            setattr(st, name, float(getattr(st, name)))
        if st.projector_lr is not None:
            st.projector_lr = float(st.projector_lr)
    validate(cfg)
    return cfg


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise TrainError(f"{key} is '{value}'", f"use one of: {', '.join(allowed)}")


def validate(cfg: RunConfig) -> None:
    """Refuse values the trainer would only trip over later."""
    for n in (1, 2):
        st = cfg.stage(n)
        _choice(st.template, TEMPLATES, f"stage{n}.template")
        _choice(st.image_mode, IMAGE_MODES, f"stage{n}.image_mode")
        _choice(st.image_position, IMAGE_POSITIONS, f"stage{n}.image_position")
    _choice(cfg.report_to, REPORT_TO, "report_to")
    _choice(cfg.model.attn_implementation, ATTENTION, "model.attn_implementation")
    _choice(cfg.model.frozen_dtype, ("auto", "bfloat16", "float32", "float16"), "model.frozen_dtype")
    _choice(cfg.export_dtype, ("auto", "bfloat16", "float32", "float16"), "export_dtype")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain dict for saving next to checkpoints."""
    return dataclasses.asdict(cfg)
