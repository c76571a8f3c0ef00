"""Stage-1 alignment pairs: shape, determinism, limits, all-captions mode, and errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from datagen.captions import clean_caption, write_caption_pairs
from datagen.cli import main
from datagen.coco import CocoIndex
from datagen.prompts import load_instructions
from datagen.quality import QualityChecker, SampleView
from datagen.sample import IMAGE_TOKEN, Sample


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(capsys, *args) -> tuple[int, str, str]:
    with mock.patch.object(sys, "argv", ["datagen", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_pairs_are_brief_instruction_plus_image_answered_by_a_coco_caption(coco_root, prompts_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    count = write_caption_pairs(coco_root, "val2017", out, seed=0)
    records = read(out)
    index = CocoIndex(coco_root, "val2017", with_instances=False)
    instructions = set(load_instructions(prompts_dir, "brief"))
    assert count == len(records) == len(index.image_ids()) == 79
    for rec in records:
        Sample.model_validate(rec)
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and len(rec["conversations"]) == 2
        assert human["value"].startswith(IMAGE_TOKEN + "\n")
        assert human["value"][len(IMAGE_TOKEN) + 1 :] in instructions
        image_id = int(rec["id"])
        assert rec["image"] == index.record(image_id).file_name and rec["split"] == "captions"
        assert gpt["value"] in {clean_caption(c) for c in index.record(image_id).captions}
    # More than one phrasing and not always the first caption: the choice is really sampled.
    assert len({r["conversations"][0]["value"] for r in records}) > 5
    firsts = sum(r["conversations"][1]["value"] == clean_caption(index.record(int(r["id"])).captions[0]) for r in records)
    assert firsts < len(records) / 2


def test_same_seed_same_bytes_other_seed_other_choices(coco_root, tmp_path):
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    write_caption_pairs(coco_root, "val2017", a, seed=7)
    write_caption_pairs(coco_root, "val2017", b, seed=7)
    write_caption_pairs(coco_root, "val2017", c, seed=8)
    assert a.read_bytes() == b.read_bytes()
    differing = sum(x != y for x, y in zip(read(a), read(c)))
    assert differing > 40  # 79 images, each re-drawn


def test_limit_takes_a_prefix_with_the_same_choices(coco_root, tmp_path):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    write_caption_pairs(coco_root, "train2017", full, seed=1)
    assert write_caption_pairs(coco_root, "train2017", part, seed=1, limit=5) == 5
    assert read(part) == read(full)[:5]


def test_all_captions_gives_every_caption_once_with_unique_ids(coco_root, tmp_path):
    out = tmp_path / "all.jsonl"
    assert write_caption_pairs(coco_root, "val2017", out, all_captions=True, limit=3) == 15
    records = read(out)
    assert len({r["id"] for r in records}) == 15
    index = CocoIndex(coco_root, "val2017", with_instances=False)
    for image_id in index.image_ids()[:3]:
        mine = [r["conversations"][1]["value"] for r in records if r["id"].startswith(f"{image_id:012d}-")]
        assert mine == [clean_caption(c) for c in index.record(image_id).captions]


def test_overwrites_and_leaves_no_temp_file(coco_root, tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text("old junk\n")
    write_caption_pairs(coco_root, "val2017", out, limit=2)
    assert len(read(out)) == 2 and list(tmp_path.iterdir()) == [out]


def test_clean_caption():
    assert clean_caption("a tripod sitting next to  a laptop\n") == "a tripod sitting next to a laptop"


def test_caption_pairs_pass_the_quality_checks(coco_root, tmp_path):
    out = tmp_path / "c.jsonl"
    write_caption_pairs(coco_root, "val2017", out, seed=0)
    checker = QualityChecker()
    rejected = [r["id"] for r in read(out) if checker.check(SampleView.from_record(r)).reasons]
    assert len(rejected) <= 2, rejected  # COCO has the odd caption ending in a comma


def test_cli_flags_and_errors(capsys, coco_root, prompts_dir, tmp_path):
    out = tmp_path / "cli.jsonl"
    code, stdout, _ = run(capsys, "captions", "--coco-root", coco_root, "--coco-split", "val2017", "--out", out,
                          "--limit", "4", "--seed", "3", "--all-captions", "--prompts-dir", prompts_dir)
    assert code == 0 and "20 caption pairs" in stdout and len(read(out)) == 20
    code, _, err = run(capsys, "captions", "--coco-root", tmp_path / "nope", "--out", out)
    assert code == 2 and err.startswith("error: COCO root not found") and "Traceback" not in err
    code, _, err = run(capsys, "captions", "--coco-root", coco_root, "--out", out, "--prompts-dir", tmp_path)
    assert code == 2 and "prompt file missing" in err
