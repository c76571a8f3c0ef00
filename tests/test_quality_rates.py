"""The gate on hand-written faithful samples (false rejects) and on bad variants of them (catch rate)."""
from __future__ import annotations

from pathlib import Path

from datagen.quality.evaluate import VARIANTS, evaluate
from datagen.quality.gate import open_lookup
from datagen.sample import read_samples

GOOD = Path(__file__).resolve().parent / "fixtures" / "good_samples.jsonl"
# Written after the checks, for train2017 images, and never used to tune them.
HELDOUT = Path(__file__).resolve().parent / "fixtures" / "good_samples_heldout.jsonl"


def test_false_reject_and_catch_rates(coco_root):
    good = list(read_samples(GOOD))
    result = evaluate(good, open_lookup(coco_root, "val2017"))
    assert result["good"] == 22
    # Measured 2/22 (both hallucinated_object on an inferred person / TV); guard against drift.
    assert result["false_rejects"] <= 2, result["false_reject_reasons"]
    assert result["catch_rate"] >= 0.95
    for variant in VARIANTS:
        stats = result["variants"][variant.name]
        assert stats["total"] > 0
        assert stats["with_expected_code"] >= 0.85 * stats["total"], (variant.name, stats)


def test_without_coco_the_object_check_is_off(coco_root):
    good = list(read_samples(GOOD))
    result = evaluate(good, None)
    assert result["false_rejects"] == 0
    assert result["variants"]["hallucination"]["total"] == 0


def test_heldout_samples_and_heldout_wording(coco_root):
    good = list(read_samples(HELDOUT))
    result = evaluate(good, open_lookup(coco_root, "train2017"), phrasing="heldout")
    assert result["good"] == 14 and result["false_rejects"] <= 1, result["false_reject_reasons"]
    # Measured 152/161: some leak wordings ("the text I was given") and hedged objects ("it might be a dog") pass.
    assert result["catch_rate"] >= 0.9
