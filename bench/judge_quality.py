"""How good is `datagen judge` as a filter? False rejects on good samples, catches on planted defects.

Run: python bench/judge_quality.py --coco-root ../shared/coco-mini [--model M --base-url URL] [--min-score 6] [--per-split 4]
     [--scoring auto|reply|logprobs]
The defects are the incoherent kinds the rule checks cannot see (answers that answer another question,
questions that go in circles) plus a planted object absent from the image. Besides the table at --min-score,
it prints the rates at other thresholds from the same scores (no new judge calls) and the mean score gap
between each good sample and its defective variants.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datagen.coco import CocoIndex  # noqa: E402
from datagen.cli.common import make_backend  # noqa: E402
from datagen.context import render_context  # noqa: E402
from datagen.judge import Scoring, run_judge  # noqa: E402
from datagen.quality.evaluate import PHRASES, hallucination  # noqa: E402
from datagen.quality.objects import default_matcher, ground_truth  # noqa: E402
from datagen.sample import IMAGE_TOKEN  # noqa: E402

Rec = dict[str, Any]


def answers(rec: Rec) -> list[dict[str, str]]:
    return [t for t in rec["conversations"] if t["from"] == "gpt"]


def mismatched(rec: Rec, other: Rec) -> Rec:
    """Every answer now answers another question: rotated within a conversation, else another image's answer."""
    out = copy.deepcopy(rec)
    turns = answers(out)
    if len(turns) >= 2:
        values = [t["value"] for t in turns]
        for t, v in zip(turns, values[1:] + values[:1]):
            t["value"] = v
    else:
        turns[0]["value"] = answers(other)[0]["value"]
    return out


def circling(rec: Rec) -> Rec:
    """The follow-up questions restate the first one and the answers restate the first answer."""
    out = copy.deepcopy(rec)
    first_q = out["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip().rstrip("?")
    first_a = answers(out)[0]["value"]
    lead = first_q[0].lower() + first_q[1:]
    out["conversations"] = out["conversations"][:2] + [
        {"from": "human", "value": f"Can you tell me again: {lead}?"}, {"from": "gpt", "value": f"As I said, {first_a[0].lower()}{first_a[1:]}"},
        {"from": "human", "value": f"So, once more, {lead}?"}, {"from": "gpt", "value": f"Again: {first_a}"},
    ]
    return out


def build_cases(coco_root: Path, per_split: int) -> tuple[list[Rec], dict[str, str]]:
    """Good samples (tests/fixtures) per split and their planted variants, each with its context; id -> kind."""
    good = [json.loads(l) for l in (REPO / "tests" / "fixtures" / "good_samples.jsonl").read_text().splitlines() if l.strip()]
    chosen: list[Rec] = []
    for split in ("conversation", "detail", "reasoning"):
        chosen += [r for r in good if r.get("split") == split][:per_split]
    index = CocoIndex(coco_root, "val2017", with_instances=True)
    matcher = default_matcher()
    cases, kinds = [], {}
    for i, rec in enumerate(chosen):
        record = index.record(int(rec["image"][:-4]))
        context = render_context(record, with_boxes=True)
        truth = ground_truth(record, matcher)
        other = chosen[(i + per_split // 2 + 1) % len(chosen)]
        variants = {"good": copy.deepcopy(rec), "hallucination": hallucination(rec, i, truth, PHRASES["heldout"]),
                    "mismatched": mismatched(rec, other), "circling": circling(rec)}
        for kind, variant in variants.items():
            variant["id"] = f"{rec['id']}~{kind}"
            variant["context"] = context
            kinds[variant["id"]] = kind
            cases.append(variant)
    return cases, kinds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coco-root", type=Path, required=True)
    p.add_argument("--model", default=None, help="judge model (default: the embedded SmolLM2-135M)")
    p.add_argument("--base-url", default=None)
    p.add_argument("--min-score", type=float, default=6.0)
    p.add_argument("--per-split", type=int, default=4)
    p.add_argument("--cache", type=Path, default=REPO / "bench" / ".cache" / "judge.sqlite")
    p.add_argument("--scoring", type=Scoring, choices=list(Scoring), default=Scoring.auto)
    p.add_argument("--max-tokens", type=int, default=96, help="judge reply tokens (--scoring reply)")
    p.add_argument("--reason-tokens", type=int, default=40, help="--scoring logprobs: reason tokens (0 = score only)")
    p.add_argument("--batch-size", type=int, default=8, help="local backend: prompts per forward pass")
    args = p.parse_args()

    cases, kinds = build_cases(args.coco_root, args.per_split)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "cases.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in cases))
        backend = make_backend("openai" if args.base_url else "local", args.model, args.base_url, args.batch_size, None)
        t0 = time.perf_counter()
        summary = run_judge(src, backend, args.min_score, out_dir=Path(tmp), cache_path=args.cache,
                            max_tokens=args.max_tokens, scoring=args.scoring,
                            reason_tokens=args.reason_tokens)
        elapsed = time.perf_counter() - t0
        verdicts, method = {}, "?"
        for name in ("cases.judged.jsonl", "cases.judge-rejects.jsonl"):
            for line in (Path(tmp) / name).read_text().splitlines():
                r = json.loads(line)
                verdicts[r["id"]] = (name.endswith("judged.jsonl"), r["judge"]["score"])
                method = r["judge"].get("method", "reply")
    table: dict[str, list[tuple[bool, float | None]]] = defaultdict(list)
    for case_id, kind in kinds.items():
        table[kind].append(verdicts[case_id])
    print(summary)
    print(f"judge {backend.name}:{backend.model} (scoring {method}), min score {args.min_score}, {len(cases)} cases, "
          f"{elapsed:.0f} s\n")
    print("| kind | cases | rejected | rate | no score | mean score |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("good", "hallucination", "mismatched", "circling"):
        rows = table[kind]
        rejected = sum(not kept for kept, _ in rows)
        scores = [s for _, s in rows if s is not None]
        label = "good (false rejects)" if kind == "good" else f"{kind} (catches)"
        mean = f"{sum(scores) / len(scores):.2f}" if scores else "n/a"
        print(f"| {label} | {len(rows)} | {rejected} | {rejected / len(rows):.0%} | {len(rows) - len(scores)} | {mean} |")
    print_sweep(kinds, verdicts)
    return 0


KINDS = ("good", "hallucination", "mismatched", "circling")


def print_sweep(kinds: dict[str, str], verdicts: dict[str, tuple[bool, float | None]]) -> None:
    """Rejection rate per kind at other thresholds (a reply without a score is a rejection at every one), and how
    often a defective variant scored below its own good sample."""
    scores = {case_id: verdicts[case_id][1] for case_id in kinds}
    print("\n| min score | " + " | ".join(f"{k} rejected" for k in KINDS) + " |")
    print("|---:|" + "---:|" * len(KINDS))
    known = sorted(v for v in scores.values() if v is not None)
    # The whole numbers, and the median score: where a judge whose scores bunch up would have to cut.
    median = [round(known[len(known) // 2], 2)] if known else []
    for threshold in sorted({3, 4, 5, 6, 7, 8, 9, *median}):
        cells = []
        for kind in KINDS:
            ids = [i for i, k in kinds.items() if k == kind]
            rejected = sum(scores[i] is None or scores[i] < threshold for i in ids)
            cells.append(f"{rejected}/{len(ids)}")
        print(f"| {threshold} | " + " | ".join(cells) + " |")
    print("\n| defect | scored below its good sample | tie | mean gap (good - defect) |")
    print("|---|---:|---:|---:|")
    for kind in KINDS[1:]:
        pairs = [(scores[i.replace(f"~{kind}", "~good")], scores[i]) for i, k in kinds.items() if k == kind]
        pairs = [(g, d) for g, d in pairs if g is not None and d is not None]
        below = sum(d < g for g, d in pairs)
        ties = sum(d == g for g, d in pairs)
        gap = f"{sum(g - d for g, d in pairs) / len(pairs):+.2f}" if pairs else "n/a"
        print(f"| {kind} | {below}/{len(pairs)} | {ties} | {gap} |")


if __name__ == "__main__":
    sys.exit(main())
