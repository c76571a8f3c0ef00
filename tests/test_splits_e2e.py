"""The negative and grounded splits end to end: CLI, fake endpoint, gate, output files, render, export."""
from __future__ import annotations

import json

import pytest

from datagen.sample import OutputLayout
from engine_support import datagen_here
from train.data import read_records, to_messages
from fake_openai_server import FakeOpenAIServer


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.parametrize("split", ["negative", "grounded"])
def test_generate_new_split_against_fake_server(coco_root, tmp_path, split):
    out = tmp_path / f"{split}.jsonl"
    with FakeOpenAIServer() as server:
        proc = datagen_here("generate", "--split", split, "--coco-root", str(coco_root), "--limit", "6",
                            "--base-url", server.base_url, "--no-cache", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    accepted, rejected = read(out), read(OutputLayout(out).rejects)
    assert len(accepted) + len(rejected) == 6
    assert len(accepted) >= 4, [(r["reject_reasons"], r["detail"]) for r in rejected]
    for rec in rejected:  # every reject says what failed
        assert rec["detail"] and all(code in rec["detail"] for code in rec["reject_reasons"]), rec
    for rec in accepted:
        assert rec["split"] == split
        if split == "negative":
            absent = rec["meta"]["absent_objects"]
            assert len(absent) == 3 and absent[0] in rec["conversations"][0]["value"]
        else:
            assert "[" in rec["conversations"][1]["value"]
    # The mix and the trainer's reader take the new splits as they are.
    mixed = tmp_path / "mix.json"
    proc = datagen_here("export", str(out), "--mix", f"{split}=1", "--out", str(mixed))
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(mixed.read_text())) == len(accepted)
    records = read_records([mixed])
    assert all(to_messages(r, "<image>")[-1]["role"] == "assistant" for r in records)


def test_render_negative_is_deterministic_for_a_seed(coco_root):
    args = ("render", "--coco-root", str(coco_root), "--split", "negative", "--image-id", "139")
    first = datagen_here(*args, "--seed", "1").stdout
    assert first == datagen_here(*args, "--seed", "1").stdout
    assert first.rstrip().splitlines()[-1].startswith("Absent objects: ")
    grounded = datagen_here("render", "--coco-root", str(coco_root), "--split", "grounded", "--image-id", "139").stdout
    detail = datagen_here("render", "--coco-root", str(coco_root), "--split", "detail", "--image-id", "139").stdout
    assert grounded == detail and first.startswith(detail.rstrip("\n"))


def test_negative_split_through_the_batch_api(coco_root, tmp_path):
    """Submit and collect build the same absent-object contexts as a live run."""
    out = tmp_path / "negative.jsonl"
    with FakeOpenAIServer(batch_polls=1) as server:
        proc = datagen_here("batch", "submit", "--split", "negative", "--coco-root", str(coco_root), "--limit", "3",
                            "--base-url", server.base_url, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        datagen_here("batch", "status", "--out", str(out))
        collected = datagen_here("batch", "collect", "--out", str(out))
        assert collected.returncode == 0, collected.stderr
    accepted = read(out)
    assert len(accepted) + len(read(OutputLayout(out).rejects)) == 3 and accepted
    assert all(len(r["meta"]["absent_objects"]) == 3 for r in accepted)
