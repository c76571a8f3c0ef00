"""eval.json and its Markdown table; `--compare A B` side by side with B - A per metric."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datagen.errors import VisinstructError

REPORT_NAME = "eval.json"
# Which way is better for each metric family (for the reader of a comparison: + is not always good).
LOWER_IS_BETTER = ("chair_i", "chair_s", "loss", "perplexity")


def load_report(path: Path) -> dict[str, Any]:
    """An eval.json, given the file or the folder holding it."""
    path = Path(path)
    file = path / REPORT_NAME if path.is_dir() else path
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VisinstructError(f"no {REPORT_NAME} at {path}", "evaluate the checkpoint first, or pass its model folder") from None
    except json.JSONDecodeError as exc:
        raise VisinstructError(f"{file} is not valid JSON ({exc.msg})", "rerun the evaluation to rewrite it") from None
    if not isinstance(report.get("metrics"), dict):
        raise VisinstructError(f"{file} has no metrics", "rerun the evaluation to rewrite it")
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def _better(metric: str) -> str:
    if metric.endswith("yes_ratio"):
        return "near 0.5"  # an unbiased model answers yes to half of POPE's balanced questions
    return "lower" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "higher"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per metric."""
    lines = [f"Checkpoint: `{report.get('checkpoint')}` (weights {report.get('checkpoint_hash')})", ""]
    lines += ["| metric | value | better |", "|---|---:|---|"]
    lines += [f"| {name} | {_fmt(value)} | {_better(name)} |" for name, value in report["metrics"].items()]
    lines += [f"\n{note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def compare_table(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, dict[str, float | None]]:
    """Metrics of A and B side by side with B - A, and the differences."""
    names = list(dict.fromkeys([*a["metrics"], *b["metrics"]]))
    diffs: dict[str, float | None] = {}
    lines = [f"A: `{a.get('checkpoint')}` (weights {a.get('checkpoint_hash')})",
             f"B: `{b.get('checkpoint')}` (weights {b.get('checkpoint_hash')})", "",
             "| metric | A | B | B - A | better |", "|---|---:|---:|---:|---|"]
    for name in names:
        va, vb = a["metrics"].get(name), b["metrics"].get(name)
        diff = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        diffs[name] = diff
        shown = "n/a" if diff is None else f"{diff:+.4f}"
        lines.append(f"| {name} | {_fmt(va)} | {_fmt(vb)} | {shown} | {_better(name)} |")
    if a.get("questions_hash") != b.get("questions_hash"):
        lines.append("\nWarning: A and B were evaluated on different question sets (seed, images or data differ); "
                     "the differences mix model and test changes.")
    for note in dict.fromkeys([*a.get("notes", []), *b.get("notes", [])]):
        lines.append(f"\n{note}")
    return "\n".join(lines), diffs
