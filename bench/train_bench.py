"""Training-step throughput and peak memory: our step vs main's before issue 13 vs LlavaForConditionalGeneration.

All sides get the same tiny random config, the same weights (ours exported to the HF class) and the same
samples of mixed lengths (as real data has); each runs in its own subprocess so peak memory is not shared.
- reference: transformers' LlavaForConditionalGeneration, padded batch, `labels=` loss
- main: the trainer's model code as of main (208358c, checked out into a temp dir), padded batch
- ours-padded / ours: this branch, padded batch / padding-free packed row (position ids, block-diagonal attention)
tokens/s counts real (non-padding) tokens. Not a timed test.
Usage: python bench/train_bench.py [--steps 5] [--batch 4] [--seq 256] [--device auto] [--main-rev 208358c]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if "visinstruct-before" not in os.environ.get("PYTHONPATH", ""):  # the "main" variant imports the old code
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
    # Sample lengths spread over [seq/4, seq]: an unpacked batch pads every row to the longest.
    lengths = torch.randint(args.seq // 4, args.seq + 1, (args.batch,), generator=g).tolist()
    lengths[0] = args.seq
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long)
    labels = torch.full((args.batch, args.seq), IGNORE)
    attention = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = torch.randint(0, vocab - 1, (n,), generator=g)
        row[1 : 1 + n_img] = image_token
        ids[i, :n] = row
        labels[i, n_img + 1 + (n - n_img - 1) // 3 : n] = row[n_img + 1 + (n - n_img - 1) // 3 :]  # answer: last 2/3
        attention[i, :n] = 1
    pixels = torch.randn(args.batch, 3, 64, 64, generator=g)
    return ours, hf, {"input_ids": ids, "labels": labels, "attention_mask": attention, "pixel_values": pixels,
                      "lengths": lengths}


def pack(batch: dict) -> dict:
    """The same samples as one padding-free row: concatenated, position ids restarting, first labels ignored."""
    import torch

    from model.llava import IGNORE

    ids, labels, positions = [], [], []
    for i, n in enumerate(batch["lengths"]):
        ids.append(batch["input_ids"][i, :n])
        lab = batch["labels"][i, :n].clone()
        lab[0] = IGNORE
        labels.append(lab)
        positions.append(torch.arange(n))
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None], "pixel_values": batch["pixel_values"]}


VARIANTS = ("reference", "main", "ours-padded", "ours")


def checkout_before(rev: str) -> Path:
    """main's model/, train/ and the error module at `rev`, extracted once into a temp dir (git archive)."""
    target = Path(tempfile.gettempdir()) / f"visinstruct-before-{rev}"
    if not (target / "model" / "llava.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "model", "train", "datagen/errors.py", "datagen/__init__.py"],
                                 cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def run_variant(args: argparse.Namespace) -> dict:
    """Time `args.steps` optimizer steps of one variant; return its measurements."""
    import torch

    from model.llava import IGNORE

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ours, hf, batch = build(args)
    n_real = sum(batch["lengths"])
    if args.variant == "ours":
        batch = pack(batch)
    batch.pop("lengths", None)
    model = hf if args.variant == "reference" else ours
    if args.variant == "reference":
        del ours
        model.model.vision_tower.requires_grad_(False)  # frozen like ours (stage 2 trains projector + LLM)
    else:
        del hf
    model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    use_bf16 = device.type == "cuda"
    n_target = int((batch["labels"][:, 1:] != IGNORE).sum())

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if args.variant == "ours":
                loss = model(batch["input_ids"], batch["pixel_values"], None, batch["labels"],
                             batch["position_ids"]) / n_target
            elif args.variant in ("main", "ours-padded"):
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
        "samples_per_s": args.batch * args.steps / dt, "tokens_per_s": n_real * args.steps / dt,
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
    p.add_argument("--main-rev", default="208358c", help="the 'before' revision of model/ and train/ (default 208358c)")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_bench.json"))
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    before = checkout_before(args.main_rev)
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "batch", "seq", "hidden", "layers", "vocab", "device")]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if variant == "main":
            env["PYTHONPATH"] = str(before)  # main's model/ and train/ win over this checkout's
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"error: {variant} run failed: {proc.stderr.strip().splitlines()[-1:]}; run it alone with "
                  f"--variant {variant} to see why", file=sys.stderr)
            return 2
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results["reference"]
    for name, r in results.items():
        assert abs(ref["first_loss"] - r["first_loss"]) < 1e-3, f"{name} must compute the reference's loss"
    ours = results["ours"]
    rows = [("samples/s", "samples_per_s", "{:.2f}"), ("tokens/s (real tokens)", "tokens_per_s", "{:.0f}"),
            ("step time (s)", "step_s", "{:.3f}"), (f"peak memory (MB, {ours['memory_kind']})", "peak_mb", "{:.0f}")]
    print(f"config: batch {args.batch} samples of {args.seq // 4}-{args.seq} tokens (64 image tokens), Llama "
          f"{args.layers}L/{args.hidden}d vocab {args.vocab}, CLIP 4L/128d frozen, mlp2x_gelu projector; "
          f"{args.steps} timed steps on {ours['device']}; main = {args.main_rev}")
    print("first-step loss: " + "  ".join(f"{k} {v['first_loss']:.5f}" for k, v in results.items()))
    print("| metric | ours (packed) | ours (padded) | main before | reference (HF Llava) | ours / main | ours / reference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, key, fmt in rows:
        vals = [results[v][key] for v in ("ours", "ours-padded", "main", "reference")]
        print(f"| {name} | " + " | ".join(fmt.format(v) for v in vals) +
              f" | {vals[0] / vals[2]:.2f}x | {vals[0] / vals[3]:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
