"""`--compare A B`: the table's values, differences and directions; both sides on the same images."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datagen.errors import VisinstructError
from train.eval import run as eval_run
from train.eval.contamination import guard
from train.eval.report import compare_table

NAMES = ["pope/random/accuracy", "pope/random/yes_ratio", "chair/chair_i", "heldout/all/loss", "bench/all/relative_score"]
values = st.one_of(st.none(), st.floats(-1e3, 1e3, allow_nan=False), st.integers(-100, 100))
metrics = st.dictionaries(st.sampled_from(NAMES), values, max_size=len(NAMES))


def row(table: str, name: str) -> list[str]:
    [line] = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


@settings(max_examples=80, deadline=None)
@given(metrics, metrics, st.booleans())
def test_compare_rows_are_b_minus_a(ma: dict, mb: dict, same_questions: bool) -> None:
    a = {"checkpoint": "runs/a/final", "checkpoint_hash": "aa", "questions_hash": "q", "metrics": ma}
    b = {"checkpoint": "runs/b/final", "checkpoint_hash": "bb", "questions_hash": "q" if same_questions else "r",
         "metrics": mb}
    table, diffs = compare_table(a, b)
    assert list(diffs) == list(dict.fromkeys([*ma, *mb]))  # every metric of either side, A's order first
    for name in diffs:
        va, vb = ma.get(name), mb.get(name)
        cells = row(table, name)
        assert cells[0] == name and len(cells) == 5
        if va is None or vb is None:
            assert diffs[name] is None and cells[3] == "n/a"
        else:
            assert diffs[name] == vb - va
            assert cells[3] == f"{vb - va:+.4f}"
        assert cells[1] == ("n/a" if va is None else str(va) if isinstance(va, int) else
                            f"{va:.4f}" if abs(va) < 10 else f"{va:.2f}")
        better = {"chair/chair_i": "lower", "heldout/all/loss": "lower", "pope/random/yes_ratio": "near 0.5"}
        assert cells[4] == better.get(name, "higher")
    assert ("Warning" in table) is (not same_questions)


def test_compare_by_hand() -> None:
    a = {"checkpoint": "A", "metrics": {"pope/random/accuracy": 0.583, "chair/chair_i": 0.667, "heldout/all/loss": 2.5}}
    b = {"checkpoint": "B", "metrics": {"pope/random/accuracy": 0.458, "chair/chair_i": 0.0, "heldout/all/loss": None}}
    table, diffs = compare_table(a, b)
    assert diffs["pope/random/accuracy"] == 0.458 - 0.583 and round(diffs["pope/random/accuracy"], 3) == -0.125
    assert row(table, "pope/random/accuracy") == ["pope/random/accuracy", "0.5830", "0.4580", "-0.1250", "higher"]
    assert row(table, "chair/chair_i") == ["chair/chair_i", "0.6670", "0.0000", "-0.6670", "lower"]
    assert row(table, "heldout/all/loss") == ["heldout/all/loss", "2.5000", "n/a", "n/a", "lower"]


def fake_run(root: Path, stage: int, image_ids: list[int]) -> Path:
    """A run folder as training leaves it (stage<N>/config.yaml naming its data file, final/ beside it)."""
    (root / f"stage{stage}").mkdir(parents=True)
    data = root / f"stage{stage}.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "image": f"{i:012d}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A thing."}]}) + "\n" for i in image_ids))
    (root / f"stage{stage}" / "config.yaml").write_text(f"stage{stage}:\n  data: [{data}]\n")
    (root / "final").mkdir()
    return root / "final"


@settings(max_examples=25, deadline=None)
@given(st.sets(st.integers(1, 40), max_size=12), st.sets(st.integers(1, 40), max_size=12))
def test_compare_leaves_out_both_sides_training_images(trained_a: set[int], trained_b: set[int]) -> None:
    """A and B are evaluated on the same images: those neither was trained on."""
    with tempfile.TemporaryDirectory() as tmp:
        a = fake_run(Path(tmp) / "a", 1, sorted(trained_a))
        b = fake_run(Path(tmp) / "b", 2, sorted(trained_b))
        ids = list(range(1, 41))
        clean_a, dropped_a, _ = guard(ids, a, True, "pope", also=[b])
        clean_b, dropped_b, _ = guard(ids, b, True, "pope", also=[a])
        assert clean_a == clean_b == [i for i in ids if i not in trained_a | trained_b]
        assert dropped_a == dropped_b == len(trained_a | trained_b)
        alone, _, _ = guard(ids, a, True, "pope")
        assert alone == [i for i in ids if i not in trained_a]
        if trained_b - trained_a:  # without --drop-contaminated the partner's images make the run refuse too
            with pytest.raises(VisinstructError, match="used in training"):
                guard(ids, a, False, "pope", also=[b])


def test_compare_cli_evaluates_each_side_with_the_other_as_partner(tmp_path: Path, monkeypatch, capsys) -> None:
    a = fake_run(tmp_path / "a", 1, [1])
    b = fake_run(tmp_path / "b", 2, [2])
    for final in (a, b):
        (final / "config.json").write_text("{}")
    seen: dict[str, list[Path]] = {}

    class Recording:
        def __init__(self, cfg) -> None:
            self.cfg = cfg

        def run(self) -> dict:
            seen[str(self.cfg.model)] = self.cfg.compare_with
            return {"checkpoint": str(self.cfg.model), "questions_hash": "q", "metrics": {"m/accuracy": 0.5}}

    monkeypatch.setattr(eval_run, "Evaluation", Recording)
    coco = ["--coco-root", str(tmp_path)]
    assert eval_run.main(["--compare", str(a), str(b), *coco, "--out", str(tmp_path / "ab")]) == 0
    assert seen == {str(a): [b], str(b): [a]}
    # A finished report on one side: nothing to take from it, the checkpoint side is evaluated alone.
    report = tmp_path / "b.json"
    report.write_text(json.dumps({"checkpoint": "b", "questions_hash": "q", "metrics": {"m/accuracy": 0.75}}))
    seen.clear()
    assert eval_run.main(["--compare", str(a), str(report), *coco]) == 0
    assert seen == {str(a): []} and "| m/accuracy | 0.5000 | 0.7500 | +0.2500 | higher |" in capsys.readouterr().out
