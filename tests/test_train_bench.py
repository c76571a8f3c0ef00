"""The GPU benchmark script's CPU-safe paths (the real run needs a GPU)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest_train import REPO


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_train_dry_run(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    gpu = _load("gpu_train")
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--reference", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    run = res["results"]["ours (LlavaLite, stage 2, packed)"]
    assert run["tokens_per_s"] > 0 and run["mfu"] is None and res["flops_per_step"] > 0
    assert res["results"]["reference (LlavaForConditionalGeneration)"]["tokens_per_s"] > 0
    assert res["loader_images_per_s"]["ours"] > 0 and res["loader_images_per_s"]["transformers processor"] > 0
    text = capsys.readouterr().out
    # The real compact-gpu shapes, counted without allocating: Qwen2.5-0.5B and CLIP ViT-L/14-336.
    assert "LLM 494M params, tower 304M" in text


def test_gpu_train_flops_model() -> None:
    gpu = _load("gpu_train")
    cfg = gpu.QWEN25_05B
    n_llm = 494_032_768
    flops = gpu.model_flops_per_step(cfg, gpu.CLIP_L_336, n_llm, 303_507_456, 1_721_216, 8, 2048, 8 * 1024)
    body = n_llm - cfg["vocab_size"] * cfg["hidden_size"]
    assert 6 * body * 8 * 2048 < flops < 2 * 6 * n_llm * 8 * 2048
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3", None) == 989.4e12 and gpu.peak_flops("weird", None) is None
