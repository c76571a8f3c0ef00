"""`--compare A B`: the table's values, differences and directions, on generated reports."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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
