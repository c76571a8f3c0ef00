"""How good is the gate? False-reject rate on good samples, catch rate on bad variants of them.

Run: python -m datagen.quality.evaluate tests/fixtures/good_samples.jsonl --coco-root ../shared/coco-mini
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from datagen.escaping import echo
from datagen.quality.checks import NEAR_DUPLICATE, QualityChecker, SampleView
from datagen.quality.config import QualityConfig
from datagen.quality.gate import open_lookup
from datagen.quality.io import ImageLookup
from datagen.sample import read_samples
from datagen.quality.objects import default_matcher, ground_truth
from datagen.sample import IMAGE_TOKEN

Rec = dict[str, Any]
# Objects to plant in a sample when the image lacks them, in order of preference.
PLANTABLE = ("dog", "car", "umbrella", "bicycle", "horse", "laptop", "pizza", "cat", "bus", "giraffe")
# Two sets of phrasings: "dev" was used while writing the checks; "heldout" was written afterwards,
# to see how the phrase-based checks do on wording they were not tuned on.
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "dev": {
        "leak": (
            "As the caption says, it is a typical scene.",
            "The bounding box of the main object is [0.12, 0.30, 0.58, 0.91].",
            "According to the descriptions given, nothing else stands out.",
            "Its box starts at 0.345 on the left side.",
        ),
        "refusal": (
            "I'm sorry, but I cannot see the image, so I can't answer that.",
            "I am unable to view the image you provided.",
        ),
        "self_talk": ("As an AI language model, I would say: ", "Sure! Here are the questions and answers: "),
        "hallucination": ("There is also a {} in the background.",),
        "cut": (0.6,),
    },
    "heldout": {
        "leak": (
            "Based on the provided captions, the scene is outdoors.",
            "The description mentions that it was taken at noon.",
            "From the object coordinates, the main subject is centered.",
            "The annotations list several items in the scene.",
            "In the text I was given, this is described as a busy place.",
            "The box [0.1, 0.2, 0.5, 0.9] marks the main object.",
            "Judging by the caption, this was taken in summer.",
            "The data provided indicate two objects.",
        ),
        "refusal": (
            "Unfortunately, I cannot view images, so I have no way to know.",
            "I'm not able to see the picture you shared.",
            "Sorry, I can't help with identifying things in photos.",
            "There is no image in your message, so I cannot describe it.",
        ),
        "self_talk": (
            "As a text-based AI, I can only guess: ",
            "Here is a conversation about the image: ",
            "Okay, let me answer. ",
            "Great question! ",
        ),
        "hallucination": (
            "You can spot a {} on the left.",
            "Two {}s are visible near the edge.",
            "A {} is resting close by.",
            "It might be a {} in the corner.",
        ),
        "cut": (0.35,),
    },
}


def _answers(rec: Rec) -> list[dict[str, str]]:
    return [t for t in rec["conversations"] if t["from"] == "gpt"]


def _append_to_answer(rec: Rec, sentence: str, last: bool = False) -> Rec:
    out = copy.deepcopy(rec)
    turn = _answers(out)[-1 if last else 0]
    turn["value"] = turn["value"].rstrip() + " " + sentence
    return out


def _pick(phrases: dict[str, tuple], kind: str, i: int):
    options = phrases[kind]
    return options[i % len(options)]


def leak(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    return _append_to_answer(rec, _pick(phrases, "leak", i))


def refusal(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    out = copy.deepcopy(rec)
    _answers(out)[-1]["value"] = _pick(phrases, "refusal", i)
    return out


def self_talk(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    out = copy.deepcopy(rec)
    turn = _answers(out)[0]
    turn["value"] = _pick(phrases, "self_talk", i) + turn["value"]
    return out


def truncation(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    """The last answer cut part-way through its words, as a token limit would cut it."""
    out = copy.deepcopy(rec)
    turn = _answers(out)[-1]
    words = turn["value"].split()
    keep = max(2, int(len(words) * _pick(phrases, "cut", i)))
    turn["value"] = " ".join(words[:keep]).rstrip(".,;:!?")
    return out


def hallucination(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    absent = [c for c in PLANTABLE if c not in truth]
    return _append_to_answer(rec, _pick(phrases, "hallucination", i).format(absent[i % len(absent)]), last=True)


def repeated_question(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    out = copy.deepcopy(rec)
    first_q = out["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
    out["conversations"] += [{"from": "human", "value": first_q}, {"from": "gpt", "value": _answers(out)[0]["value"]}]
    return out


def misplaced_image(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    """<image> moved from the first question into an answer (or doubled)."""
    out = copy.deepcopy(rec)
    first = out["conversations"][0]
    if i % 2:
        first["value"] = first["value"] + "\n" + IMAGE_TOKEN
        first["value"] = IMAGE_TOKEN + "\n" + first["value"].replace(IMAGE_TOKEN, "", 1).strip()
    else:
        first["value"] = first["value"].replace(IMAGE_TOKEN, "").strip()
        _answers(out)[0]["value"] = IMAGE_TOKEN + " " + _answers(out)[0]["value"]
    return out


def swapped_turns(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    out = copy.deepcopy(rec)
    turns = out["conversations"]
    turns[0]["from"], turns[1]["from"] = turns[1]["from"], turns[0]["from"]
    return out


def empty_answer(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    out = copy.deepcopy(rec)
    _answers(out)[-1]["value"] = "  "
    return out


def too_short(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec | None:
    """A one-phrase answer where the split needs a paragraph (not applicable to conversation)."""
    if rec.get("split") == "conversation":
        return None
    out = copy.deepcopy(rec)
    _answers(out)[-1]["value"] = "A photo of a scene."
    return out


def too_long(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    out = copy.deepcopy(rec)
    turn = _answers(out)[-1]
    words = turn["value"].split()
    # Rambling to ~450 words with shifting wording, as weak models do at high max-tokens.
    filler = [f"{w}{'' if (k + 1) % 23 else ' and then'}" for k, w in enumerate(words * (460 // max(1, len(words)) + 1))]
    turn["value"] = " ".join(filler[:460]).rstrip(".,") + "."
    return out


def near_copy(rec: Rec, i: int, truth: set[str], phrases: dict) -> Rec:
    """The same answers under another id, one word changed: a template the generator repeated."""
    out = copy.deepcopy(rec)
    out["id"] = f"{rec['id']}-copy"
    turn = _answers(out)[-1]
    words = turn["value"].split()
    words[len(words) // 2] = "really " + words[len(words) // 2]
    turn["value"] = " ".join(words)
    return out


@dataclass(frozen=True)
class Variant:
    """A programmatic corruption of a good sample and the reason code it should trigger."""

    name: str
    expected: str
    make: Callable[[Rec, int, set[str], dict], Rec | None]


VARIANTS: tuple[Variant, ...] = (
    Variant("leak", "source_leak", leak),
    Variant("refusal", "refusal", refusal),
    Variant("self_talk", "ai_self_talk", self_talk),
    Variant("truncation", "truncated", truncation),
    Variant("hallucination", "hallucinated_object", hallucination),
    Variant("repeated_question", "repeated_question", repeated_question),
    Variant("misplaced_image", "image_token", misplaced_image),
    Variant("swapped_turns", "bad_roles", swapped_turns),
    Variant("empty_answer", "empty_turn", empty_answer),
    Variant("too_short", "too_short", too_short),
    Variant("too_long", "too_long", too_long),
    Variant("near_copy", NEAR_DUPLICATE, near_copy),
)


@dataclass
class VariantResult:
    total: int = 0
    rejected: int = 0
    with_expected_code: int = 0
    missed_ids: list[str] = field(default_factory=list)


def evaluate(
    good: list[Rec], lookup: ImageLookup | None, config: QualityConfig | None = None, phrasing: str = "dev"
) -> dict[str, Any]:
    """False rejects among good samples; per variant, how many bad copies were rejected (and for the right reason)."""
    config = config or QualityConfig()
    matcher = default_matcher()
    # One stream: good samples fill the near-duplicate index, then near copies of them follow.
    stream = QualityChecker(config)
    per_sample = QualityChecker(config.with_overrides(disabled_checks=[*config.disabled_checks, NEAR_DUPLICATE]))
    false_rejects: dict[str, list[str]] = {}
    records = {}
    for rec in good:
        record = lookup.find(rec.get("image")) if lookup else None
        records[rec["id"]] = record
        report = stream.check(SampleView.from_record(rec, record=record))
        if report.reasons:
            false_rejects[rec["id"]] = report.reasons
    results: dict[str, VariantResult] = {v.name: VariantResult() for v in VARIANTS}
    for variant in VARIANTS:
        checker = stream if variant.expected == NEAR_DUPLICATE else per_sample
        for i, rec in enumerate(good):
            record = records[rec["id"]]
            truth = ground_truth(record, matcher) if record else set()
            if variant.expected == "hallucinated_object" and record is None:
                continue
            bad = variant.make(rec, i, truth, PHRASES[phrasing])
            if bad is None:
                continue
            reasons = checker.check(SampleView.from_record(bad, record=record)).reasons
            result = results[variant.name]
            result.total += 1
            result.rejected += bool(reasons)
            result.with_expected_code += variant.expected in reasons
            if variant.expected not in reasons:
                result.missed_ids.append(rec["id"])
    bad_total = sum(r.total for r in results.values())
    return {
        "good": len(good),
        "false_rejects": len(false_rejects),
        "false_reject_rate": len(false_rejects) / len(good) if good else None,
        "false_reject_reasons": false_rejects,
        "bad": bad_total,
        "caught": sum(r.rejected for r in results.values()),
        "catch_rate": sum(r.rejected for r in results.values()) / bad_total if bad_total else None,
        "caught_with_expected_code": sum(r.with_expected_code for r in results.values()),
        "variants": {name: vars(r) for name, r in results.items()},
    }


# The reason codes each family of new checks owns (a good sample rejected with one of them is that check's false reject).
FAMILY_CODES: dict[str, tuple[str, ...]] = {
    "negation": ("absent_not_denied", "absent_object_named"),
    "grounding": ("malformed_box", "invented_box", "no_box"),
    "counting": ("wrong_count",),
    "placement": ("wrong_position",),
    "generic": ("hallucinated_object",),
}


@dataclass
class FamilyResult:
    """One family's figures: good samples and their rejects, planted errors and their catches."""

    good: int = 0
    good_rejected_by_family: int = 0
    good_rejected_any: int = 0
    planted: int = 0
    caught_with_expected_code: int = 0
    caught_any: int = 0
    false_rejects: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        rate = lambda n, d: round(n / d, 4) if d else None  # noqa: E731
        return {**{k: v for k, v in vars(self).items() if k not in ("false_rejects", "missed")},
                "false_reject_rate": rate(self.good_rejected_by_family, self.good),
                "false_reject_rate_any_check": rate(self.good_rejected_any, self.good),
                "catch_rate": rate(self.caught_with_expected_code, self.planted),
                "false_rejects": self.false_rejects[:10], "missed": self.missed[:10]}


def evaluate_families(records: list[Rec], lookups: dict[str, ImageLookup], config: QualityConfig | None = None,
                      family_codes: dict[str, tuple[str, ...]] = FAMILY_CODES) -> dict[str, dict[str, Any]]:
    """Per family (meta.family): false rejects of its checks on good records, catches of planted ones (meta.planted).

    Near-duplicates are off: template-written samples resemble each other by construction.
    """
    config = config or QualityConfig()
    checker = QualityChecker(config.with_overrides(disabled_checks=[*config.disabled_checks, NEAR_DUPLICATE]))
    results: dict[str, FamilyResult] = {}
    for rec in records:
        meta = rec["meta"]
        lookup = lookups.get(meta["coco_split"])
        record = lookup.find(rec["image"]) if lookup else None
        report = checker.check(SampleView.from_record(rec, record=record))
        result = results.setdefault(meta["family"], FamilyResult())
        codes = family_codes[meta["family"]]
        if meta["planted"] is None:
            result.good += 1
            by_family = [r for r in report.reasons if r in codes]
            result.good_rejected_by_family += bool(by_family)
            result.good_rejected_any += bool(report.reasons)
            if report.reasons:
                result.false_rejects.append(f"{rec['id']}: {report.details}")
        else:
            result.planted += 1
            result.caught_any += bool(report.reasons)
            result.caught_with_expected_code += meta["planted"] in report.reasons
            if meta["planted"] not in report.reasons:
                result.missed.append(rec["id"])
    return {name: r.as_dict() for name, r in sorted(results.items())}


def main(
    good_file: Path = typer.Argument(..., help="Hand-written good samples (LLaVA JSONL)."),
    coco_root: Optional[Path] = typer.Option(None, help="COCO root (enables the object check)."),
    coco_split: str = typer.Option("val2017"),
    phrasing: str = typer.Option("dev", help="Bad-variant wording: dev (used while writing the checks) or heldout."),
    json_output: bool = typer.Option(False, "--json"),
) -> None:
    """Print the false-reject rate and per-variant catch rates."""
    if phrasing not in PHRASES:
        raise typer.BadParameter(f"use one of {', '.join(PHRASES)}", param_hint="--phrasing")
    result = evaluate(list(read_samples(good_file)), open_lookup(coco_root, coco_split), phrasing=phrasing)
    if json_output:
        echo(json.dumps(result, indent=2))
        return
    echo(f"good samples: {result['good']}, false rejects: {result['false_rejects']} "
         f"({100 * (result['false_reject_rate'] or 0):.1f}%) {result['false_reject_reasons']}")
    echo(f"bad variants: {result['bad']}, rejected: {result['caught']} ({100 * (result['catch_rate'] or 0):.1f}%), "
         f"with the expected code: {result['caught_with_expected_code']}")
    for name, r in result["variants"].items():
        echo(f"  {name:18s} {r['rejected']:3d}/{r['total']:<3d} rejected, {r['with_expected_code']:3d} with expected code"
             + (f"; missed: {', '.join(r['missed_ids'][:4])}" if r["missed_ids"] else ""))


if __name__ == "__main__":
    typer.run(main)
