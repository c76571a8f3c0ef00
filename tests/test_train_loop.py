"""The training loop: overfitting, resume equivalence, stage hand-off, export, CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from guards import HANG_GUARD_S
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from conftest_train import COCO, REPO, coco_captions, save_tiny_llm, tiny_clip_config, write_caption_pairs, write_instruct
from train import chat, run
from model.llava import ModelConfig
from train.config import LoraConfig, RunConfig, StageConfig, load_config
from train import loop
from train.loop import export_checkpoint, train_stage


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def _cfg(tmp_path: Path, llm_dir: Path, **stage2: object) -> RunConfig:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    caps = write_caption_pairs(data / "caps.jsonl", n=8)
    ins = write_instruct(data / "ins.json", n=8, as_array=True)
    s2 = dict(data=[str(ins)], image_folder=str(COCO / "val2017"), train_llm=True, lr=2e-3, batch_size=2,
              grad_accum=2, max_steps=4, max_length=128, warmup_ratio=0.25)
    s2.update(stage2)
    return RunConfig(
        name="test", output_dir=str(tmp_path / "run"), seed=0,
        model=ModelConfig(llm=str(llm_dir), vision_config=tiny_clip_config(), projector="mlp2x_gelu"),
        stage1=StageConfig(data=[str(caps)], image_folder=str(COCO / "train2017"), lr=1e-2, batch_size=4,
                           max_steps=2, max_length=64),
        stage2=StageConfig(**s2), save_every=2, keep_checkpoints=3, num_workers=0,
    )


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_overfit_one_batch(tmp_path: Path, llm_dir: Path) -> None:
    cfg = _cfg(tmp_path, llm_dir, batch_size=2, grad_accum=1, max_steps=20, lr=2e-2, init_projector="",
               warmup_ratio=0.0)
    ins = write_instruct(tmp_path / "two.jsonl", n=2)
    cfg.stage2.data = [str(ins)]
    cfg.num_workers = 1  # encoding and image decoding in a data-loader worker process
    res = train_stage(cfg, 2, do_export=False)
    losses = [r["loss"] for r in _metrics(res.stage_dir / "metrics.jsonl")]
    assert len(losses) == 20 and losses[-1] < 0.4 * losses[0], losses
    rows = _metrics(res.stage_dir / "metrics.jsonl")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"} <= set(rows[0])
    assert (res.stage_dir / "loss.png").stat().st_size > 1000


def test_resume_gives_the_same_curve(tmp_path: Path, llm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = _cfg(tmp_path / "a", llm_dir, init_projector="")
    a = train_stage(full, 2, do_export=False)
    part = _cfg(tmp_path / "b", llm_dir, init_projector="")
    calls = []

    def interrupted(stage, batches):  # noqa: ANN001, ANN202 - the run is killed during step 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loop.train_step.__wrapped__(stage, batches)

    interrupted.__wrapped__ = loop.train_step  # type: ignore[attr-defined]
    monkeypatch.setattr(loop, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_stage(part, 2, do_export=False)
    monkeypatch.undo()
    assert (Path(part.output_dir) / "stage2" / "checkpoint-2").is_dir()
    b = train_stage(part, 2, resume=True, do_export=False)
    ma, mb = _metrics(a.stage_dir / "metrics.jsonl"), _metrics(b.stage_dir / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], abs=1e-5)
        assert ra["lr"] == pytest.approx(rb["lr"])
    wa = load_file(str(a.stage_dir / "checkpoint-4" / "trainable.safetensors"))
    wb = load_file(str(b.stage_dir / "checkpoint-4" / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_two_stages_lora_and_export(tmp_path: Path, llm_dir: Path) -> None:
    cfg = _cfg(tmp_path, llm_dir, lora=LoraConfig(enabled=True, r=4, alpha=8), max_steps=2)
    r1 = train_stage(cfg, 1)
    trained = load_file(str(r1.stage_dir / "checkpoint-2" / "trainable.safetensors"))
    assert trained and all(k.startswith("projector.") for k in trained), "stage 1 trains the projector only"
    r2 = train_stage(cfg, 2)
    assert r2.export_dir == Path(cfg.output_dir) / "final"
    names = load_file(str(r2.stage_dir / "checkpoint-2" / "trainable.safetensors")).keys()
    assert any("lora_" in k for k in names) and not any(k.startswith("llm.") and "lora_" not in k for k in names)
    hf = LlavaForConditionalGeneration.from_pretrained(str(r2.export_dir))
    assert hf.config.image_seq_length == 16 and hf.config.projector_hidden_act == "gelu"
    image = COCO / "val2017" / coco_captions("val2017")[1][0]
    assert chat.main(["--model", str(r2.export_dir), "--image", str(image), "--max-new-tokens", "3", "What?"]) == 0
    # --export from an intermediate checkpoint
    out = export_checkpoint(cfg, 2, r2.stage_dir / "checkpoint-2", tmp_path / "exp")
    assert LlavaForConditionalGeneration.from_pretrained(str(out)).config.model_type == "llava"


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_cli_errors(tmp_path: Path, llm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--config", "no-such-config"]) == 2
    assert "config 'no-such-config' not found" in _error_line(capsys)
    assert run.main(["--config", "smoke-cpu", "--stage", "1", "--data", str(tmp_path / "nope.jsonl"),
                     "--set", f"model.llm={llm_dir}", "--output-dir", str(tmp_path / "r")]) == 2
    assert "data file" in _error_line(capsys)
    assert run.main(["--config", "smoke-cpu", "--set", "stage1.nonsense=1"]) == 2
    assert "unknown config key" in _error_line(capsys)
    assert run.main(["--config", "smoke-cpu", "--stage", "1", "--set", "model.llm=./no/such/model"]) == 2
    assert "does not exist" in _error_line(capsys)
    assert chat.main(["--model", str(tmp_path), "--image", "x.jpg", "q"]) == 2
    assert "no exported model" in _error_line(capsys)


def test_config_overrides() -> None:
    cfg = load_config("smoke-cpu", ["stage2.lr=1e-4", "stage2.lora.enabled=true", "seed=7"])
    assert cfg.stage2.lr == 1e-4 and cfg.stage2.lora.enabled and cfg.seed == 7
    for name in ("compact-gpu", "llava-7b"):
        c = load_config(name)
        assert c.stage1.lr == 1e-3 and c.stage2.lr == 2e-5 and c.model.vision_tower


@pytest.mark.slow
def test_unknown_hub_model_id_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "train.run", "--config", "smoke-cpu", "--stage", "1", "--output-dir", str(tmp_path),
         "--set", "model.llm=no-such-org/no-such-model"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not load tokenizer 'no-such-org/no-such-model'") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_accumulation(tmp_path: Path, llm_dir: Path) -> None:
    """torchrun with 2 CPU (gloo) ranks x batch 2 == 1 process x batch 2 x accum 2: same batches, same curve."""
    single = _cfg(tmp_path / "single", llm_dir, init_projector="", max_steps=3)
    ref = train_stage(single, 2, do_export=False)
    ddp_dir = tmp_path / "ddp"
    cfg_path = tmp_path / "ddp.yaml"
    import dataclasses

    import yaml

    tree = dataclasses.asdict(_cfg(ddp_dir, llm_dir, init_projector="", max_steps=3, grad_accum=1))
    cfg_path.write_text(yaml.safe_dump(tree))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    import socket

    with socket.socket() as sock:  # a free port, so parallel CI jobs do not collide on torchrun's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "train.run",
         "--config", str(cfg_path), "--stage", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = _metrics(ddp_dir / "run" / "stage2" / "metrics.jsonl")
    theirs = _metrics(ref.stage_dir / "metrics.jsonl")
    assert [r["step"] for r in ours] == [1, 2, 3]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert (ddp_dir / "run" / "final" / "config.json").is_file()
