"""Stage-2 training throughput and model FLOPs utilisation (MFU) for the compact-gpu shapes on one GPU.

Random weights with the shapes of CLIP ViT-L/14-336 (frozen, 576 image tokens) + Qwen2.5-0.5B-Instruct
(trained), mlp2x_gelu projector, bf16 autocast over fp32 master weights, gradient checkpointing, AdamW.
Samples have mixed lengths (--min-frac x seq to seq), as real data does.
- ours: the trainer's step: padding-free packed row (position ids, no cross-sample attention), frozen tower
  in bf16 and stopped at its feature layer, chunked LM-head cross-entropy, fused AdamW, optional --compile
- reference (--reference): transformers' LlavaForConditionalGeneration on the padded batch, same weights
- data loader: images/s of the trainer's image path (decode + pad/resize + normalise) in worker processes,
  and of the transformers processor in the same loader, on synthetic 640x480 JPEGs
MFU counts the model FLOPs of the real (non-padding) tokens for both. Nothing is downloaded.
Budget: well under 8 minutes on one H100.
Usage: python bench/gpu_train.py [--batch 8] [--seq 2048] [--steps 10] [--reference] [--compile]
       python bench/gpu_train.py --dry-run      # tiny shapes on CPU: checks the whole script, numbers meaningless
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
    p.add_argument("--min-frac", type=float, default=0.25, help="shortest sample, as a fraction of --seq (default 0.25)")
    p.add_argument("--compile", action="store_true", help="torch.compile the LLM in our step")
    p.add_argument("--attn", default="sdpa", help="attention implementation of the LLM (default sdpa)")
    p.add_argument("--loader-images", type=int, default=512, help="images for the data-loader measurement")
    p.add_argument("--workers", type=int, default=8, help="data-loader workers (default 8, capped by the CPUs)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--reference", action="store_true", help="also time LlavaForConditionalGeneration (same weights)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, 2 steps: checks the script only")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_train.json"), help="JSON results file")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch, args.seq, args.steps, args.warmup, args.loader_images, args.workers = 2, 64, 2, 1, 8, 1
    return args


def peak_flops(device_name: str, override: float | None) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU, if known."""
    if override:
        return override * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def model_flops_per_step(llm_cfg: dict, vis_cfg: dict, n_llm_params: int, n_vis_params: int, n_proj_params: int,
                         batch: int, seq: int, n_labelled: int, lengths: list[int] | None = None) -> float:
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

    from model.llava import LlavaLite, enable_activation_checkpointing
    from model.projector import build_projector
    from model.vision import VisionTower

    vis_cfg, llm_cfg = (TINY_CLIP, TINY_QWEN) if args.dry_run else (CLIP_L_336, QWEN25_05B)
    torch.manual_seed(0)
    with torch.device(device):
        tower = VisionTower(CLIPVisionModel(CLIPVisionConfig(**vis_cfg)), -2)
        llm = Qwen2ForCausalLM(Qwen2Config(**llm_cfg, attn_implementation=args.attn))
        proj = build_projector("mlp2x_gelu", vis_cfg["hidden_size"], llm_cfg["hidden_size"])
    image_token = llm_cfg["vocab_size"] - 1
    model = LlavaLite(tower, proj, llm, image_token)
    if not args.no_grad_ckpt:
        enable_activation_checkpointing(llm)
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
    """Samples of mixed length, one image block each, labels on the last answer-frac: (padded, packed, lengths)."""
    import torch

    from model.llava import IGNORE

    g = torch.Generator().manual_seed(1)
    low = max(n_img + 16, int(args.seq * args.min_frac))
    lengths = torch.randint(low, args.seq + 1, (args.batch,), generator=g).tolist()
    lengths[0] = args.seq
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long)
    labels = torch.full((args.batch, args.seq), IGNORE)
    attention = torch.zeros_like(ids)
    packed_ids, packed_labels, positions = [], [], []
    for i, n in enumerate(lengths):
        row = torch.randint(0, vocab - 1, (n,), generator=g)
        row[8 : 8 + n_img] = vocab - 1
        lab = row.clone()
        lab[: max(8 + n_img, int(n * (1 - args.answer_frac)))] = IGNORE
        ids[i, :n], labels[i, :n], attention[i, :n] = row, lab, 1
        first_ignored = lab.clone()
        first_ignored[0] = IGNORE
        packed_ids.append(row)
        packed_labels.append(first_ignored)
        positions.append(torch.arange(n))
    pixels = torch.randn(args.batch, 3, image_size, image_size, generator=g)
    padded = {"input_ids": ids, "labels": labels, "attention_mask": attention, "pixel_values": pixels}
    packed = {"input_ids": torch.cat(packed_ids)[None], "labels": torch.cat(packed_labels)[None],
              "position_ids": torch.cat(positions)[None], "pixel_values": pixels}
    return ({k: v.to(device) for k, v in padded.items()}, {k: v.to(device) for k, v in packed.items()}, lengths)


def loader_images_per_s(args: argparse.Namespace, image_size: int) -> dict:
    """Images/s of the data loader alone: the trainer's image path vs the transformers processor, same workers."""
    import tempfile

    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from transformers import LlavaImageProcessor

    from train.build import default_workers
    from train.images import ImageTransform, load_image

    proc = LlavaImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                               do_pad=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
    transform = ImageTransform.from_processor(proc)

    class Images(Dataset):
        def __init__(self, paths: list[Path], fast: bool) -> None:
            self.paths, self.fast = paths, fast

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, i: int):  # noqa: ANN204
            image = load_image(self.paths[i])
            return transform(image) if self.fast else proc(images=[image], return_tensors="pt")["pixel_values"][0]

    workers = default_workers(args.workers)
    results = {"workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(min(args.loader_images, 64)):  # 64 distinct files, read repeatedly (page cache, like a warm disk)
            base = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None] * np.ones((480, 1, 3), np.float32)
            pixels = np.clip(base + rng.normal(0, 20, (480, 640, 3)), 0, 255).astype(np.uint8)
            path = Path(tmp) / f"{i}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            paths.append(path)
        paths = [paths[i % len(paths)] for i in range(args.loader_images)]
        for label, fast in (("ours", True), ("transformers processor", False)):
            loader = DataLoader(Images(paths, fast), batch_size=16, num_workers=workers)
            t0 = time.perf_counter()
            n = sum(batch.shape[0] for batch in loader)
            results[label] = n / (time.perf_counter() - t0)
    return results


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
    batch, packed, lengths = make_batch(args, n_img, llm_cfg["vocab_size"], vis_cfg["image_size"], device)
    n_labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert n_labelled == int((packed["labels"][:, 1:] != IGNORE).sum()), "packing must keep every label"
    n_real = sum(lengths)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    flops = model_flops_per_step(llm_cfg, vis_cfg, count(model.llm), count(model.tower), count(model.projector),
                                 args.batch, args.seq, n_labelled, lengths)
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
            "step_s": sec, "tokens_per_s": n_real / sec, "samples_per_s": args.batch / sec,
            "tflops_per_s": flops / sec / 1e12, "mfu": (flops / sec / peak) if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        del opt

    model.llm.requires_grad_(True)
    if device.type == "cuda":
        model.tower.to(torch.bfloat16)  # frozen: no master copy needed (the trainer's frozen_dtype auto)
    if args.compile:
        model.llm = torch.compile(model.llm, dynamic=True)
    with torch.no_grad():
        same = float(model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]))
        ours_packed = float(model(packed["input_ids"], packed["pixel_values"], None, packed["labels"],
                                  packed["position_ids"]))
    print(f"loss, padded vs packed (same samples): {same:.4f} vs {ours_packed:.4f}")
    measure("ours (LlavaLite, stage 2, packed)", model, lambda: model(
        packed["input_ids"], packed["pixel_values"], None, packed["labels"], packed["position_ids"]) / n_labelled)
    if args.compile:
        model.llm = model.llm._orig_mod
    if args.reference:
        from model.export import to_hf_llava
        from model.llava import enable_activation_checkpointing

        hf = to_hf_llava(model, "mlp2x_gelu").to(device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf.model.vision_tower.requires_grad_(False)
        if not args.no_grad_ckpt:
            enable_activation_checkpointing(hf)
        measure("reference (LlavaForConditionalGeneration)", hf, lambda: hf(**batch).loss)

    loader = loader_images_per_s(args, vis_cfg["image_size"])
    print(f"device: {name}; batch {args.batch} samples of {min(lengths)}-{args.seq} tokens ({n_real} real tokens, "
          f"{n_img} image tokens each, {n_labelled} labelled), "
          f"bf16 autocast {bf16}, grad checkpointing {not args.no_grad_ckpt}; model FLOPs/step {flops / 1e12:.2f} T")
    print("| run | step (s) | tokens/s | samples/s | TFLOP/s | MFU | peak mem (GiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | "
              f"{r['tflops_per_s']:.1f} | {mfu} | {mem} |")
    print(f"data loader ({loader['workers']} workers, {args.loader_images} 640x480 JPEGs -> "
          f"{vis_cfg['image_size']}px): ours {loader['ours']:.0f} images/s, "
          f"transformers processor {loader['transformers processor']:.0f} images/s")
    if "reference (LlavaForConditionalGeneration)" in results:
        o, r = results["ours (LlavaLite, stage 2, packed)"], results["reference (LlavaForConditionalGeneration)"]
        print(f"ours / reference: {o['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s")
    if args.dry_run:
        print("dry run: tiny shapes on CPU; the numbers say nothing about GPU performance")
        print(f"compact-gpu shapes (counted on the meta device): {real_shape_summary()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "args": vars(args), "flops_per_step": flops, "results": results,
                               "loader_images_per_s": loader, "lengths": lengths}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
