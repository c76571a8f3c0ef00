"""Decoding paths of the local backend side by side, on the embedded model: the same 12 prompts (4 images x 3
splits), each repeated `--candidates` times (best-of-N rows, as `make data` runs them).

plain:  one left-padded batch of the full prompts through transformers' `generate` (before issue 10).
before: `generate_rows` as it was at git revision `--against` (read from git, run side by side), when given.
heads:  `generate_rows` of this tree (heads' KV computed once: their cost is reported apart, paid once per run).
All greedy, `--tokens` new tokens, alternated `--repeats` times; wall and CPU seconds per batch, and each path's
CPU ratio to `heads`.

    nice -n 10 python bench/local_decode_bench.py --tokens 32 --repeats 2 --candidates 2 --against 7ff049c
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from datagen.backends.local import LocalBackend  # noqa: E402
from datagen.backends.local_decode import HeadCache, Row, generate_rows  # noqa: E402
from datagen.coco import CocoIndex  # noqa: E402
from datagen.context import ContextBuilder  # noqa: E402
from datagen.prompts import load_prompt_set  # noqa: E402

SPLITS = ("conversation", "detail", "reasoning")


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def module_at(rev: str):
    """datagen/backends/local_decode.py as it was at git revision `rev`, imported under another name."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:datagen/backends/local_decode.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "local_decode_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("local_decode_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", type=Path, default=REPO.parent / "shared" / "coco-mini")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=1, help="rows per prompt (best-of-N)")
    parser.add_argument("--against", help="git revision whose generate_rows runs as `before`")
    parser.add_argument("--skip-plain", action="store_true", help="leave out transformers' generate")
    args = parser.parse_args()
    backend = LocalBackend()
    tok, lm = backend._tokenizer, backend._lm
    index = CocoIndex(args.coco_root, "val2017", with_instances=True)
    ids = index.image_ids()[:args.images]
    chats = []
    for split in SPLITS:
        prompts, builder = load_prompt_set(None, split), ContextBuilder(split)
        chats += [prompts.messages(builder.render(index.record(i))[0]) for i in ids]
    split_rows = [backend.prompt_tokens(chat) for chat in chats for _ in range(args.candidates)]
    rows = [Row(head, tail) for head, tail in split_rows]
    full = [list(head + tail) for head, tail in split_rows]
    width = max(map(len, full))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in full])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in full])
    eos = [tok.eos_token_id]

    def plain():
        with torch.inference_mode():
            return lm.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.tokens,
                               min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    heads = HeadCache(lm)
    _, head_wall, head_cpu = timed(lambda: [heads.get(r.head) for r in rows])

    def shared():
        return generate_rows(lm, rows, heads, max_new_tokens=args.tokens, pad_id=tok.pad_token_id, eos_ids=eos,
                             min_new_tokens=args.tokens)

    paths = {} if args.skip_plain else {"plain": plain}
    if args.against:
        before = module_at(args.against)
        before_heads = before.HeadCache(lm)
        for r in rows:
            before_heads.get(r.head)

        def earlier():
            return before.generate_rows(lm, [before.Row(r.head, r.tail) for r in rows], before_heads,
                                        max_new_tokens=args.tokens, pad_id=tok.pad_token_id, eos_ids=eos,
                                        min_new_tokens=args.tokens)
        paths["before"] = earlier
    paths["heads"] = shared
    results = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            _, wall, cpu = timed(fn)
            results[name].append((round(wall, 2), round(cpu, 2)))
    cpu_total = {name: sum(c for _, c in runs) for name, runs in results.items()}
    line = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": len(rows), "tokens": args.tokens,
            "prompt_tokens": sum(map(len, full)), "padded_prompt_tokens": len(full) * width,
            "tail_tokens": sum(len(r.tail) for r in rows), "distinct_heads": heads.computed,
            "heads_once_wall_cpu_s": (round(head_wall, 2), round(head_cpu, 2)), "threads": torch.get_num_threads(),
            "load": round(os.getloadavg()[0], 2), "candidates": args.candidates, "against": args.against,
            "wall_cpu_s": results,
            "cpu_ratio_to_heads": {name: round(total / cpu_total["heads"], 2) for name, total in cpu_total.items()}}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
