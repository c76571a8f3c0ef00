"""Stage-2 training throughput and model FLOPs utilisation (MFU) for the compact-gpu shapes on one GPU.

Random weights with the shapes of CLIP ViT-L/14-336 (frozen, 576 image tokens) + Qwen2.5-0.5B-Instruct
(trained), mlp2x_gelu projector, bf16 autocast over fp32 master weights, gradient checkpointing, AdamW.
Nothing is downloaded. Budget: well under 8 minutes on one H100.
Usage: python bench/gpu_train.py [--batch 8] [--seq 2048] [--steps 10] [--reference]
       python bench/gpu_train.py --dry-run      # tiny shapes on CPU: checks the script, numbers meaningless
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                 patch_size=14)
TINY_QWEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="per-step batch (default 8)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length incl. 576 image tokens (default 2048)")
    p.add_argument("--answer-frac", type=float, default=0.5, help="fraction of positions with labels (default 0.5)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--reference", action="store_true", help="also time LlavaForConditionalGeneration (same weights)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, 2 steps: checks the script only")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_train.json"), help="JSON results file")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 2, 1
    return args


def peak_flops(device_name: str, override: float | None) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU, if known."""
    if override:
        return override * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def model_flops_per_step(llm_cfg: dict, vis_cfg: dict, n_llm_params: int, n_vis_params: int, n_proj_params: int,
                         batch: int, seq: int, n_labelled: int) -> float:
    """Model FLOPs of one step (recomputation from checkpointing is not counted, as MFU requires).

    LLM: 6 x non-embedding params per token plus causal attention 6 x layers x hidden x seq per token
    (fwd+bwd, half the full 12 for the causal mask); LM head 6 x hidden x vocab only on labelled positions
    (the loop computes no other logits); frozen tower: forward only (2 x params per token);
    projector: 6 x params per image token.
    """
    d, L, V = llm_cfg["hidden_size"], llm_cfg["num_hidden_layers"], llm_cfg["vocab_size"]
    tokens = batch * seq
    emb = V * d
    body = n_llm_params - emb * (1 if llm_cfg.get("tie_word_embeddings") else 2)
    llm = 6 * body * tokens + 6 * L * d * seq * tokens + 6 * d * V * n_labelled
    n_patch = (vis_cfg["image_size"] // vis_cfg["patch_size"]) ** 2
    vis_tokens = batch * (n_patch + 1)
    vision = 2 * n_vis_params * vis_tokens + 4 * vis_cfg["num_hidden_layers"] * vis_cfg["hidden_size"] * (n_patch + 1) * vis_tokens
    proj = 6 * n_proj_params * batch * n_patch
    return float(llm + vision + proj)


def build(args: argparse.Namespace, device):  # noqa: ANN001, ANN201
    """Random compact-gpu-shaped model (tiny for --dry-run) built directly on the device."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    from model.llava import LlavaLite
    from model.projector import build_projector
    from model.vision import VisionTower

    vis_cfg, llm_cfg = (TINY_CLIP, TINY_QWEN) if args.dry_run else (CLIP_L_336, QWEN25_05B)
    torch.manual_seed(0)
    with torch.device(device):
        tower = VisionTower(CLIPVisionModel(CLIPVisionConfig(**vis_cfg)), -2)
        llm = Qwen2ForCausalLM(Qwen2Config(**llm_cfg))
        proj = build_projector("mlp2x_gelu", vis_cfg["hidden_size"], llm_cfg["hidden_size"])
    image_token = llm_cfg["vocab_size"] - 1
    model = LlavaLite(tower, proj, llm, image_token)
    if not args.no_grad_ckpt:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, vis_cfg, llm_cfg


def real_shape_summary(batch: int = 8, seq: int = 2048) -> str:
    """Parameter counts and FLOPs/step of the real compact-gpu shapes, without allocating them."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336))
        llm = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    d = QWEN25_05B["hidden_size"]
    n_proj = CLIP_L_336["hidden_size"] * d + d + d * d + d
    flops = model_flops_per_step(QWEN25_05B, CLIP_L_336, count(llm), count(tower), n_proj, batch, seq, batch * seq // 2)
    return (f"LLM {count(llm) / 1e6:.0f}M params, tower {count(tower) / 1e6:.0f}M, projector {n_proj / 1e6:.1f}M; "
            f"{flops / 1e12:.1f} TFLOP per step at batch {batch} x seq {seq}")


def make_batch(args: argparse.Namespace, n_img: int, vocab: int, image_size: int, device):  # noqa: ANN001, ANN201
    """Random ids with one image block; labels on the last answer-frac of each row."""
    import torch

    from model.llava import IGNORE

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 1, (args.batch, args.seq), generator=g)
    ids[:, 8 : 8 + n_img] = vocab - 1
    labels = ids.clone()
    labels[:, : int(args.seq * (1 - args.answer_frac))] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(args.batch, 3, image_size, image_size, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def time_loop(args: argparse.Namespace, step, device) -> float:  # noqa: ANN001
    """Seconds per step after warmup."""
    import torch

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from model.llava import IGNORE

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU visible; run on a GPU machine, or use --dry-run to check the script on CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    model, vis_cfg, llm_cfg = build(args, device)
    n_img = model.num_image_tokens
    if args.seq <= n_img + 16:
        print(f"error: --seq {args.seq} leaves no room for text after {n_img} image tokens; raise --seq",
              file=sys.stderr)
        return 2
    batch = make_batch(args, n_img, llm_cfg["vocab_size"], vis_cfg["image_size"], device)
    n_labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    flops = model_flops_per_step(llm_cfg, vis_cfg, count(model.llm), count(model.tower), count(model.projector),
                                 args.batch, args.seq, n_labelled)
    peak = peak_flops(name, args.peak_tflops)
    bf16 = device.type == "cuda"
    results = {}

    def measure(label: str, net, forward) -> None:  # noqa: ANN001
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-5, fused=device.type == "cuda")
        net.train()

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = forward()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = time_loop(args, step, device)
        results[label] = {
            "step_s": sec, "tokens_per_s": args.batch * args.seq / sec, "samples_per_s": args.batch / sec,
            "tflops_per_s": flops / sec / 1e12, "mfu": (flops / sec / peak) if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        del opt

    model.llm.requires_grad_(True)
    measure("ours (LlavaLite, stage 2)", model, lambda: model(
        batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]) / n_labelled)
    if args.reference:
        from model.export import to_hf_llava

        hf = to_hf_llava(model, "mlp2x_gelu").to(device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf.model.vision_tower.requires_grad_(False)
        if not args.no_grad_ckpt:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        measure("reference (LlavaForConditionalGeneration)", hf, lambda: hf(**batch).loss)

    print(f"device: {name}; batch {args.batch} x seq {args.seq} ({n_img} image tokens, {n_labelled} labelled), "
          f"bf16 autocast {bf16}, grad checkpointing {not args.no_grad_ckpt}; model FLOPs/step {flops / 1e12:.2f} T")
    print("| run | step (s) | tokens/s | samples/s | TFLOP/s | MFU | peak mem (GiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | "
              f"{r['tflops_per_s']:.1f} | {mfu} | {mem} |")
    if args.dry_run:
        print("dry run: tiny shapes on CPU; the numbers say nothing about GPU performance")
        print(f"compact-gpu shapes (counted on the meta device): {real_shape_summary()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "args": vars(args), "flops_per_step": flops, "results": results},
                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
