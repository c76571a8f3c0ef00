"""The gate on hand-written faithful samples (false rejects) and on bad variants of them (catch rate)."""
from __future__ import annotations

from pathlib import Path

import pytest

from datagen.quality.config import QualityConfig
from datagen.quality.eval_samples import TEMPLATE_SETS, build_records
from datagen.quality.evaluate import FAMILY_CODES, VARIANTS, evaluate, evaluate_families
from datagen.quality.gate import open_lookup
from datagen.sample import read_samples

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = FIXTURES / "good_samples.jsonl"
# Written after the checks, for train2017 images, and never used to tune them.
HELDOUT = Path(__file__).resolve().parent / "fixtures" / "good_samples_heldout.jsonl"


def test_false_reject_and_catch_rates(coco_root):
    good = list(read_samples(GOOD))
    result = evaluate(good, open_lookup(coco_root, "val2017"))
    assert result["good"] == 22
    # Measured 1/22 (hallucinated_object on an inferred TV; the generic-mention leniency of issue 11 cleared an
    # inferred person); guard against drift.
    assert result["false_rejects"] <= 1, result["false_reject_reasons"]
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


# --- the checks of issue 11, per family -------------------------------------------------------

FAMILY_LIMITS = {"false_reject_rate": 0.05, "catch_rate": 0.90}


@pytest.fixture(scope="module")
def family_lookups(coco_root):
    return {split: open_lookup(coco_root, split) for split in TEMPLATE_SETS.values()}


@pytest.mark.parametrize("kind", list(TEMPLATE_SETS))
def test_family_rates(coco_root, family_lookups, kind):
    """Each new check: false rejects <= 5% of > 100 good samples, catches >= 90% of planted errors.

    "dev" templates (val2017) were used while writing the checks; "heldout" (train2017, other wording) was not.
    """
    result = evaluate_families(build_records(kind, coco_root), family_lookups)
    assert set(result) == set(FAMILY_CODES)
    for family, r in result.items():
        assert r["good"] > 100 and r["planted"] > 100, (family, r["good"], r["planted"])
        assert r["false_reject_rate"] <= FAMILY_LIMITS["false_reject_rate"], (family, r["false_rejects"])
        assert r["catch_rate"] >= FAMILY_LIMITS["catch_rate"], (family, r["missed"])


def test_generic_leniency_keeps_todays_hallucination_catches(coco_root):
    """The gate's leniency catches the same planted hallucinations as the strict reading on the hand-written samples."""
    good = list(read_samples(GOOD))
    lookup = open_lookup(coco_root, "val2017")
    lenient = evaluate(good, lookup)["variants"]["hallucination"]
    strict = evaluate(good, lookup, QualityConfig(lenient_object_mentions=False))["variants"]["hallucination"]
    assert lenient["with_expected_code"] == strict["with_expected_code"] == strict["total"]


HANDWRITTEN = [FIXTURES / f"split_samples_handwritten{suffix}.jsonl" for suffix in ("", "_heldout", "_final")]


def test_handwritten_free_form_samples(coco_root, family_lookups):
    """Free-form samples written by hand (three sets, 61 reasoning answers full of generic talk about people).

    Measured on first sight (before the changes each set then led to): reasoning 7/20, 3/21, 2/20 rejected.
    """
    records = [rec for path in HANDWRITTEN for rec in read_samples(path)]
    result = evaluate_families(records, family_lookups)
    generic = result["generic"]
    # Measured 2/61: an inferred desk, and "a bathroom shared by several people" (a count of people, read as a claim).
    assert generic["good"] == 61 and generic["good_rejected_any"] <= 2, generic["false_rejects"]
    strict = evaluate_families(records, family_lookups, QualityConfig(lenient_object_mentions=False))["generic"]
    assert strict["good_rejected_by_family"] >= 25  # what today's check does to them
    for family in ("counting", "placement", "grounding"):
        assert result[family]["good_rejected_by_family"] == 0, result[family]["false_rejects"]
    caught = sum(r["caught_with_expected_code"] for r in result.values())
    assert caught >= sum(r["planted"] for r in result.values()) - 1  # the planted 'zookeeper' is not a COCO word


def test_leniency_keeps_catching_hallucinations_planted_in_free_form_reasoning(coco_root, family_lookups):
    for path in HANDWRITTEN:
        good = [r for r in read_samples(path) if r["meta"]["family"] == "generic" and not r["meta"]["planted"]]
        lookup = family_lookups[good[0]["meta"]["coco_split"]]
        lenient = evaluate(good, lookup)["variants"]["hallucination"]
        strict = evaluate(good, lookup, QualityConfig(lenient_object_mentions=False))["variants"]["hallucination"]
        assert lenient["with_expected_code"] == strict["with_expected_code"] == lenient["total"], (path.name, lenient)
