"""Optimizer steps per backend: with gradient accumulation, DDP and DeepSpeed step once per window.

DDP runs 2 CPU (gloo) processes x batch 1 x accumulation 2 for 2 optimizer steps; the reference
is one process x batch 4 x no accumulation over the same samples. Counted: the optimizer's own step count
in the saved state, and the trained weights, which must equal the reference's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from guards import HANG_GUARD_S
import torch
import yaml
from safetensors.torch import load_file

from conftest_train import COCO, REPO, save_tiny_llm, tiny_clip_config, write_instruct
from model.llava import ModelConfig
from train.config import RunConfig, StageConfig
from train.loop import train_stage

STEPS = 2


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def _cfg(root: Path, llm_dir: Path, batch: int, accum: int) -> RunConfig:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    ins = write_instruct(data / "ins.jsonl", n=8)
    return RunConfig(
        name="backends", output_dir=str(root / "run"), seed=0, num_workers=0, group_by_length=False,
        model=ModelConfig(llm=str(llm_dir), vision_config=tiny_clip_config(), projector="mlp2x_gelu"),
        stage2=StageConfig(data=[str(ins)], image_folder=str(COCO / "val2017"), train_llm=True, lr=1e-3,
                           batch_size=batch, grad_accum=accum, max_steps=STEPS, max_length=128, warmup_ratio=0.0,
                           init_projector=""),
    )


def _optimizer_steps(stage_dir: Path) -> int:
    """The optimizer's own step counter in the final checkpoint (rank 0's state)."""
    state = torch.load(stage_dir / f"checkpoint-{STEPS}" / "state-rank0.pt", weights_only=False)["optimizer"]
    steps = {int(float(s["step"])) for s in state["state"].values() if "step" in s}
    assert len(steps) == 1, steps
    return steps.pop()


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / f"checkpoint-{STEPS}" / "trainable.safetensors"))


def _launch(tmp_path: Path, llm_dir: Path, name: str, env_extra: dict[str, str]) -> Path:
    cfg = _cfg(tmp_path / name, llm_dir, batch=1, accum=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    with socket.socket() as sock:  # a free port, so parallel CI jobs do not collide on torchrun's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "train.run", "--config", str(path), "--stage", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(cfg.output_dir) / "stage2"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, llm_dir: Path) -> Path:
    res = train_stage(_cfg(tmp_path_factory.mktemp("ref"), llm_dir, batch=4, accum=1), 2, do_export=False)
    return res.stage_dir


def _check(stage_dir: Path, reference: Path, backend: str) -> None:
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert (summary["backend"], summary["processes"]) == (backend, 2)
    assert _optimizer_steps(stage_dir) == STEPS, "one optimizer step per accumulation window"
    assert _optimizer_steps(reference) == STEPS
    ours, ref = _weights(stage_dir), _weights(reference)
    assert ours.keys() == ref.keys()
    worst = max(float((ours[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-5, f"weights after {STEPS} windows differ from one big batch by {worst}"
    rows = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_ddp_steps_once_per_window(tmp_path: Path, llm_dir: Path, reference: Path) -> None:
    _check(_launch(tmp_path, llm_dir, "ddp", {}), reference, "MULTI_CPU")


# FSDP: accelerate 1.15 turns ACCELERATE_USE_FSDP into FSDP only on GPU-type devices (a 2-process CPU run
# stays MULTI_CPU, which the backend check above would catch), so FSDP's step count needs a multi-GPU box.


class CountingEngine:
    """Stand-in for DeepSpeed's engine behind accelerate's DeepSpeedEngineWrapper (a real DeepSpeed CPU run
    was not attempted in the time there was): scales by 1/accumulation in backward as DeepSpeed does, and
    steps the optimizer only when `step` is called at an accumulation boundary, counting the calls."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], accumulation: int) -> None:
        self.optimizer, self.params, self.accumulation = optimizer, params, accumulation
        self.boundary, self.step_calls, self.norm = False, 0, None

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundary = is_boundary

    def backward(self, loss: torch.Tensor, **_: object) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.step_calls += 1
        if self.boundary:
            self.norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> torch.Tensor | None:
        return self.norm


def test_deepspeed_path_steps_once_per_window(tmp_path: Path, llm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through accelerate's real DeepSpeedEngineWrapper and DeepSpeedOptimizerWrapper, with a counting engine."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper, DeepSpeedOptimizerWrapper

    from train import loop
    from train.build import build_stage, micro_batches

    big = build_stage(_cfg(tmp_path / "big", llm_dir, batch=4, accum=1), 2)
    batches = micro_batches(big, 0)
    for _ in range(STEPS):
        loop.train_step(big, [next(batches)])
    expected = {n: p.detach().clone() for n, p in big.raw_model.named_parameters() if p.requires_grad}

    small = build_stage(_cfg(tmp_path / "small", llm_dir, batch=2, accum=2), 2)
    engine = CountingEngine(small.optimizer, small.trainable, 2)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    small.accelerator.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)
    small.optimizer = DeepSpeedOptimizerWrapper(small.optimizer)  # its step/zero_grad are no-ops, as under DeepSpeed
    batches = micro_batches(small, 0)
    for _ in range(STEPS):
        res = loop.train_step(small, [next(batches) for _ in range(2)])
        assert res.grad_norm == res.grad_norm, "DeepSpeed's grad norm is reported"
    assert engine.step_calls == STEPS, f"{engine.step_calls} engine steps for {STEPS} accumulation windows"
    got = {n: p.detach() for n, p in small.raw_model.named_parameters() if p.requires_grad}
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst < 1e-5, worst
