"""Training-step throughput and peak memory: our loop vs LlavaForConditionalGeneration in a plain loop.

Both sides get the same tiny random config, the same weights (ours exported to the HF class) and the
same batch; each runs in its own subprocess so peak memory is not shared. Not a timed test.
Usage: python bench/train_bench.py [--steps 10] [--batch 4] [--seq 256] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench")


def build(args: argparse.Namespace):  # noqa: ANN201 - returns (our model, hf model, batch)
    """Tiny random tower + Llama, our composite and its exact HF Llava copy, and one fixed batch."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from model.export import to_hf_llava
    from model.llava import IGNORE, LlavaLite
    from model.projector import build_projector
    from model.vision import VisionTower

    torch.manual_seed(0)
    vocab = args.vocab
    image_token = vocab - 1
    tower = VisionTower(CLIPVisionModel(CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=64,
        patch_size=8)), -2)  # 64 image tokens
    llm = LlamaForCausalLM(LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=4096,
        tie_word_embeddings=False))
    ours = LlavaLite(tower, build_projector("mlp2x_gelu", 128, args.hidden), llm, image_token)
    hf = to_hf_llava(ours, "mlp2x_gelu")
    n_img = tower.num_patches
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 1, (args.batch, args.seq), generator=g)
    ids[:, 1 : 1 + n_img] = image_token
    labels = ids.clone()
    labels[:, : args.seq // 2] = IGNORE  # prompt + image ignored, second half is "answer"
    attention = torch.ones_like(ids)
    pixels = torch.randn(args.batch, 3, 64, 64, generator=g)
    return ours, hf, {"input_ids": ids, "labels": labels, "attention_mask": attention, "pixel_values": pixels}


def run_variant(args: argparse.Namespace) -> dict:
    """Time `args.steps` optimizer steps of one variant; return its measurements."""
    import torch

    from model.llava import IGNORE

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ours, hf, batch = build(args)
    model = ours if args.variant == "ours" else hf
    if args.variant == "ours":
        del hf
    else:
        del ours
        model.model.vision_tower.requires_grad_(False)  # frozen like ours (stage 2 trains projector + LLM)
    model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    use_bf16 = device.type == "cuda"
    n_target = int((batch["labels"][:, 1:] != IGNORE).sum())

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if args.variant == "ours":
                loss = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]) / n_target
            else:
                loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first = step()
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "variant": args.variant, "device": str(device), "first_loss": first,
        "samples_per_s": args.batch * args.steps / dt, "tokens_per_s": args.batch * args.seq * args.steps / dt,
        "step_s": dt / args.steps, "peak_mb": peak, "rss_before_train_mb": rss_before / 1024,
        "memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_bench.json"))
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    results = {}
    for variant in ("reference", "ours"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "batch", "seq", "hidden", "layers", "vocab", "device")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if proc.returncode != 0:
            print(f"error: {variant} run failed: {proc.stderr.strip().splitlines()[-1:]}; run it alone with "
                  f"--variant {variant} to see why", file=sys.stderr)
            return 2
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, ours = results["reference"], results["ours"]
    assert abs(ref["first_loss"] - ours["first_loss"]) < 1e-3, "both sides must compute the same loss"
    rows = [("samples/s", "samples_per_s", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:.0f}"),
            ("step time (s)", "step_s", "{:.3f}"), (f"peak memory (MB, {ours['memory_kind']})", "peak_mb", "{:.0f}")]
    print(f"config: batch {args.batch} x seq {args.seq} (64 image tokens), Llama {args.layers}L/{args.hidden}d "
          f"vocab {args.vocab}, CLIP 4L/128d frozen, mlp2x_gelu projector; {args.steps} timed steps on {ours['device']}")
    print(f"first-step loss: ours {ours['first_loss']:.5f}  reference {ref['first_loss']:.5f}")
    print(f"| metric | ours (LlavaLite loop) | reference (LlavaForConditionalGeneration loop) | ours / reference |")
    print("|---|---:|---:|---:|")
    for name, key, fmt in rows:
        print(f"| {name} | {fmt.format(ours[key])} | {fmt.format(ref[key])} | {ours[key] / ref[key]:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
