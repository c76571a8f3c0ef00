"""Training CLI: `python -m train.run --config smoke-cpu --stage 1|2|all [--resume] [--export [CKPT]]`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from datagen.escaping import terminal_text
from model.errors import TrainError
from train.arguments import ArgumentParser
from train.config import RunConfig, load_config

if TYPE_CHECKING:
    from train.loop import StageResult

log = logging.getLogger("train")

EPILOG = """examples:
  python -m train.run --config smoke-cpu --stage all
  python -m train.run --config smoke-cpu --stage 2 --resume
  python -m train.run --config compact-gpu --stage 2 --lora --set stage2.lr=2e-4
  python -m train.run --config smoke-cpu --stage 2 --export runs/smoke/stage2/checkpoint-16 --export-to out/hf
  accelerate launch --config_file train/configs/accelerate/fsdp.yaml -m train.run --config llava-7b --stage 2
  torchrun --nproc_per_node 8 -m train.run --config compact-gpu --stage 2
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; any config key can also be set with --set key=value."""
    p = ArgumentParser(
        prog="python -m train.run", description="Train the compact LLaVA model (stage 1: projector; stage 2: +LLM).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="smoke-cpu", help="YAML path or name under train/configs/ (default smoke-cpu)")
    p.add_argument("--stage", default="all", choices=["1", "2", "all"], help="which stage(s) to run (default all)")
    p.add_argument("--resume", action="store_true", help="continue the stage from its latest checkpoint")
    p.add_argument("--export", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="export a checkpoint (default: the stage's latest) to LlavaForConditionalGeneration format")
    p.add_argument("--export-to", default=None, help="output folder for --export (default CKPT/hf)")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--max-steps", type=int, default=None, help="override max_steps of the selected stage(s)")
    p.add_argument("--max-length", type=int, default=None, help="override max_length of the selected stage(s)")
    p.add_argument("--data", nargs="+", default=None, help="override the stage's data files (JSON/JSONL)")
    p.add_argument("--image-folder", default=None, help="override the stage's image folder")
    p.add_argument("--freeze-llm", action="store_true", help="stage 2: train the projector only")
    p.add_argument("--lora", action="store_true", help="stage 2: train LoRA adapters instead of the full LLM")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set stage2.batch_size=4 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> tuple[RunConfig, list[int]]:
    """Config with flag overrides applied, and the stages to run."""
    stages = [1, 2] if args.stage == "all" else [int(args.stage)]
    sets = list(args.overrides)
    for n in stages:
        if args.max_steps is not None:
            sets.append(f"stage{n}.max_steps={args.max_steps}")
        if args.max_length is not None:
            sets.append(f"stage{n}.max_length={args.max_length}")
        if args.data is not None:
            sets.append(f"stage{n}.data={json.dumps(args.data)}")
        if args.image_folder is not None:
            sets.append(f"stage{n}.image_folder={json.dumps(args.image_folder)}")
    if args.freeze_llm:
        sets.append("stage2.train_llm=false")
    if args.lora:
        sets += ["stage2.train_llm=true", "stage2.lora.enabled=true"]
    if args.output_dir:
        sets.append(f"output_dir={json.dumps(args.output_dir)}")
    if args.seed is not None:
        sets.append(f"seed={args.seed}")
    return load_config(args.config, sets), stages


def summary_line(n: int, res: "StageResult") -> str:
    """The run summary of one stage: steps, loss and how much it fell, data kept, caption conditioning."""
    text = f"stage {n}: {res.steps} steps, final loss {res.last_loss:.4f}"
    if res.loss_fall:
        f = res.loss_fall
        text += (f", mean loss first quarter {f['first_quarter']:.4f} -> last quarter {f['last_quarter']:.4f} "
                 f"({100 * f['fall']:.1f}% lower)")
    text += f", kept {res.report['kept']}/{res.report['total']} samples"
    if res.conditioning:
        c = res.conditioning
        text += (f"; caption loss per token over {c['samples']} pairs: with image {c['with_image']:.4f}, "
                 f"another image {c['mismatched_image']:.4f}, no image tokens {c['no_image']:.4f}")
    text += f"; metrics {res.stage_dir / 'metrics.jsonl'}" + (f", model {res.export_dir}" if res.export_dir else "")
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 2."""
    args = parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun/accelerate set RANK; other ranks stay quiet
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from train.loop import export_checkpoint, train_stage

        cfg, stages = build_config(args)
        if args.export is not None:
            if len(stages) != 1:
                raise TrainError("--export needs one stage", "add --stage 1 or --stage 2")
            ckpt = None if args.export == "latest" else Path(args.export)
            out = export_checkpoint(cfg, stages[0], ckpt, Path(args.export_to) if args.export_to else None)
            print(f"exported: {out}")
            return 0
        for n in stages:
            res = train_stage(cfg, n, resume=args.resume and n == stages[0])
            if main_rank:
                print(summary_line(n, res))
        return 0
    except TrainError as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)  # may quote a sample id or a file name
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
