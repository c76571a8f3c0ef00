"""`datagen check | stats | review | export` end to end on files, including LLaVA's released layout."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from datagen.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = FIXTURES / "good_samples.jsonl"
LLAVA = FIXTURES / "llava_format_sample.json"


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run `datagen ARGS` in this process (fast); returns exit code, stdout, stderr."""
    with mock.patch.object(sys, "argv", ["datagen", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], err
    assert fragment in lines[0] and "Traceback" not in err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


# --- check -------------------------------------------------------------------------------------


def test_check_writes_accepted_unchanged_and_rejected_with_reasons(capsys, coco_root, tmp_path):
    good = read_jsonl(GOOD)[:3]
    bad = {**good[0], "id": "bad-1", "conversations": conv("<image>\nWhat is there?", "I'm sorry, I cannot see images.")}
    leak = {**good[1], "id": "bad-2", "conversations": conv("<image>\nWhat is there?", "As the caption says, a dog.")}
    src = write_jsonl(tmp_path / "in.jsonl", [*good, bad, leak])
    acc, rej = tmp_path / "acc.jsonl", tmp_path / "rej.jsonl"
    code, out, _ = run(capsys, "check", src, "--coco-root", coco_root, "--coco-split", "val2017",
                       "--out-accepted", acc, "--out-rejected", rej)
    assert code == 0
    assert read_jsonl(acc) == good  # byte-for-byte the same records
    rejected = read_jsonl(rej)
    assert [r["id"] for r in rejected] == ["bad-1", "bad-2"]
    assert rejected[0]["reject_reasons"] == ["refusal"] and rejected[1]["reject_reasons"] == ["source_leak"]
    assert {k: v for k, v in rejected[0].items() if k not in ("reject_reasons", "reject_details")} == bad
    # Each reject says what failed, not only the code.
    assert "sorry" in rejected[0]["reject_details"]["refusal"]
    assert "caption" in rejected[1]["reject_details"]["source_leak"]
    assert "5 samples: 3 accepted" in out and "refusal" in out and "CHAIR_i" in out


def test_check_json_summary_and_skipped_object_check(capsys, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", read_jsonl(GOOD)[:4])
    code, out, _ = run(capsys, "check", src, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["total"] == 4 and summary["accepted"] == 4
    assert summary["object_check"].startswith("skipped") and summary["chair"]["chair_i"] is None
    code, out, _ = run(capsys, "check", src)
    assert "skipped: no --coco-root" in out


def test_check_on_llava_released_layout(capsys, coco_root, tmp_path):
    # A JSON array without split fields, <image> at the end of some first turns, COCO train2017 images.
    acc = tmp_path / "acc.json"
    code, out, _ = run(capsys, "check", LLAVA, "--coco-root", coco_root, "--coco-split", "train2017", "--json",
                       "--out-accepted", acc, "--out-rejected", tmp_path / "rej.jsonl")
    summary = json.loads(out)
    assert code == 0 and summary["total"] == 4 and summary["images_not_in_coco"] == 0
    assert summary["reject_reasons"] == {"image_token": 2, "hallucinated_object": 1}
    code, out, _ = run(capsys, "check", LLAVA, "--coco-root", coco_root, "--coco-split", "train2017", "--json",
                       "--allow-trailing-image", "--out-accepted", acc)
    summary = json.loads(out)
    assert summary["accepted"] == 3 and summary["reject_reasons"] == {"hallucinated_object": 1}
    accepted = json.loads(acc.read_text())  # .json output is an array, like the input
    original = json.loads(LLAVA.read_text())
    assert accepted == [r for r in original if r["id"] != "000000069468"]
    rejected = read_jsonl(tmp_path / "rej.jsonl")
    assert {r["id"] for r in rejected} == {"000000030752", "000000037666", "000000069468"}


def test_check_flags_override_config(capsys, tmp_path):
    record = {"id": "1", "image": "x.jpg", "split": "detail", "conversations": conv("<image>\nDescribe.", "A kitchen.")}
    src = write_jsonl(tmp_path / "in.jsonl", [record])
    cfg = tmp_path / "q.yaml"
    cfg.write_text("lengths:\n  detail:\n    min_answer_words: 1\n")
    assert json.loads(run(capsys, "check", src, "--json")[1])["reject_reasons"] == {"too_short": 1}
    assert json.loads(run(capsys, "check", src, "--json", "--config", cfg)[1])["accepted"] == 1
    assert json.loads(run(capsys, "check", src, "--json", "--disable", "too_short")[1])["accepted"] == 1


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "file not found"),
        ('{"id": 1, "conversations": []}\n{"id": 2,\n', "not valid JSON"),
        ('[{"id": 1, "conversations": [', "not valid JSON"),
        ('{"id": 1, "text": "hello"}\n', "not a LLaVA-format sample"),
        ('[{"id": 1, "conversations": [{"role": "user", "content": "hi"}]}]', "turn 0 is not an object"),
        ('["just a string"]', "not a sample object"),
        ("id,image\n1,x.jpg\n", "neither JSONL nor a JSON array"),
    ],
)
def test_bad_input_files_give_one_line_and_exit_2(capsys, tmp_path, content, fragment):
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_text(content)
    for command in (["check", path], ["stats", path], ["review", path], ["export", path, "--out", tmp_path / "o.json", "--split", "detail", "--mix", "none"]):
        code, _, err = run(capsys, *command)
        assert_user_error(code, err, fragment)


def test_bad_config_and_coco_root_are_user_errors(capsys, tmp_path):
    cfg = tmp_path / "q.yaml"
    cfg.write_text("near_duplicate_threshold: 7\n")
    code, _, err = run(capsys, "check", GOOD, "--config", cfg)
    assert_user_error(code, err, "near_duplicate_threshold")
    code, _, err = run(capsys, "check", GOOD, "--coco-root", tmp_path / "nowhere")
    assert_user_error(code, err, "COCO root not found")
    copy = write_jsonl(tmp_path / "in.jsonl", read_jsonl(GOOD))
    code, _, err = run(capsys, "check", copy, "--out-rejected", copy)
    assert_user_error(code, err, "is also the input file")
    assert read_jsonl(copy) == read_jsonl(GOOD)


# --- stats -------------------------------------------------------------------------------------


def test_stats_numbers(capsys, coco_root, tmp_path):
    records = [
        {"id": "a", "image": "000000000802.jpg", "split": "conversation", "conversations": conv(
            "<image>\nWhat is in it?", "A white refrigerator and an oven.",
            "What color are the cabinets?", "Brown.")},
        {"id": "b", "image": "000000000802.jpg", "split": "detail", "conversations": conv(
            "<image>\nDescribe the image.", "A kitchen with a refrigerator, an oven and a cat.")},
        {"id": "c", "image": "000000000802.jpg", "split": "detail", "reject_reasons": ["too_short"],
         "conversations": conv("<image>\nHow is the kitchen?", "Clean.")},
    ]
    src = write_jsonl(tmp_path / "s.jsonl", records)
    code, out, _ = run(capsys, "stats", src, "--json", "--coco-root", coco_root)
    stats = json.loads(out)
    assert code == 0 and set(stats) == {"conversation", "detail", "all"}
    c, d, a = stats["conversation"], stats["detail"], stats["all"]
    assert c["samples"] == 1 and c["turns_per_sample"]["mean"] == 4.0
    assert c["question_words"] == {"mean": 4.5, "p50": 4.5, "p95": pytest.approx(4.95)}
    assert c["answer_words"]["mean"] == 3.5  # 6 words and 1 word
    assert c["question_types"] == {"what": 1.0}
    assert d["question_types"] == {"describe": 0.5, "how": 0.5}
    assert c["top_objects"] == {"refrigerator": 1, "oven": 1}
    # detail b names refrigerator, oven, cat (cat hallucinated); c names nothing.
    assert d["chair_i"] == pytest.approx(1 / 3) and d["chair_s"] == pytest.approx(1 / 2)
    assert c["chair_i"] == 0.0 and a["chair_s"] == pytest.approx(1 / 3)
    assert d["rejected"] == 1 and d["reject_reasons"] == {"too_short": 1}
    assert a["samples"] == 3 and a["answer_words"]["p50"] == 3.5  # 6, 1, 10, 1
    code, out, _ = run(capsys, "stats", src)
    assert code == 0 and "CHAIR_i" in out and "conversation" in out and "needs --coco-root" in out


def test_stats_reads_split_from_llava_file_names(capsys, tmp_path):
    named = tmp_path / "complex_reasoning_77k.json"
    named.write_text(LLAVA.read_text())
    stats = json.loads(run(capsys, "stats", named, "--json")[1])
    assert list(stats) == ["reasoning"] and stats["reasoning"]["samples"] == 4


# --- review (terminal) -------------------------------------------------------------------------


def test_review_terminal_shows_context_conversation_and_flags(capsys, coco_root, tmp_path):
    record = {"id": "000000000802", "image": "000000000802.jpg", "split": "detail", "meta": {"finish_reason": "stop"},
              "conversations": conv("<image>\nDescribe the image.",
                                    "A kitchen with a refrigerator and an oven. As the caption says, a cat sleeps there.")}
    src = write_jsonl(tmp_path / "r.jsonl", [record, *read_jsonl(GOOD)[:2]])
    code, out, _ = run(capsys, "review", src, "--coco-root", coco_root, "--reason", "any")
    assert code == 0
    assert "1/1" in out and "000000000802" in out
    assert "Stark white appliances" in out  # context re-rendered from COCO (detail: with boxes)
    assert "refrigerator: [0.578, 0.289, 0.969, 0.846]" in out
    assert "source_leak" in out and "hallucinated_object" in out and "cat (not in image)" in out
    code, out, _ = run(capsys, "review", src, "--start", "2", "--limit", "1")
    assert code == 0 and "1/1  #2 in file" in out and "object check skipped" in out


# --- export ------------------------------------------------------------------------------------


def _split_files(tmp_path: Path, n: int = 20) -> list[Path]:
    paths = []
    for split in ("conversation", "detail", "reasoning"):
        recs = [{"id": f"{i:012d}", "image": f"{i:012d}.jpg", "split": split,
                 "conversations": conv("<image>\nQ?", f"{split} answer {i}.")} for i in range(n)]
        paths.append(write_jsonl(tmp_path / f"{split}.jsonl", recs))
    return paths


def test_export_mix_is_deterministic_with_unique_ids(capsys, tmp_path):
    files = _split_files(tmp_path)
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    for out in (out1, out2):
        code, stdout, _ = run(capsys, "export", *files, "--out", out, "--seed", "3", "--json")
        assert code == 0
    assert out1.read_bytes() == out2.read_bytes()
    data = json.loads(out1.read_text())
    report = json.loads(stdout)
    # LLaVA's 58:23:77 with 20 of each: reasoning is the scarcest (20 / 0.487 = 41 samples in all).
    assert report["per_split"] == {"conversation": 15, "detail": 5, "reasoning": 20}
    assert len(data) == 40 and len({r["id"] for r in data}) == 40
    assert all(set(r) == {"id", "image", "conversations"} for r in data)
    assert [r["id"] for r in data] != sorted(r["id"] for r in data)  # shuffled
    other = tmp_path / "c.json"
    run(capsys, "export", *files, "--out", other, "--seed", "4")
    assert other.read_bytes() != out1.read_bytes()


def test_export_custom_mix_total_and_none(capsys, tmp_path):
    files = _split_files(tmp_path)
    out = tmp_path / "o.json"
    report = json.loads(run(capsys, "export", *files, "--out", out, "--mix", "detail=1,reasoning=1", "--json")[1])
    assert report["per_split"] == {"detail": 20, "reasoning": 20}
    report = json.loads(run(capsys, "export", *files, "--out", out, "--mix", "none", "--total", "30", "--json")[1])
    assert report["written"] == 30
    report = json.loads(run(capsys, "export", *files, "--out", out, "--mix", "none", "--json", "--keep-meta")[1])
    data = json.loads(out.read_text())
    assert report["written"] == 60 and report["renamed_ids"] == 40 and len({r["id"] for r in data}) == 60
    assert {r["split"] for r in data} == {"conversation", "detail", "reasoning"}
    code, _, err = run(capsys, "export", files[0], "--out", out)
    assert_user_error(code, err, "no samples: detail, reasoning")
    code, _, err = run(capsys, "export", *files, "--out", out, "--mix", "detail")
    assert_user_error(code, err, "bad --mix entry")


def test_export_image_paths_relative_to_image_folder(capsys, coco_root, tmp_path):
    good = tmp_path / "detail.jsonl"
    recs = [r for r in read_jsonl(GOOD) if r["split"] == "detail"]
    missing = {**recs[0], "id": "missing", "image": "000000999999.jpg"}
    write_jsonl(good, [*recs, missing, {**recs[1], "reject_reasons": ["refusal"]}])
    out = tmp_path / "llava.json"
    code, stdout, _ = run(capsys, "export", good, "--out", out, "--mix", "none", "--image-folder", coco_root,
                          "--images-dir", coco_root / "val2017", "--json")
    report = json.loads(stdout)
    assert code == 0 and report["missing_images"] == 1 and report["skipped_rejected"] == 1
    data = json.loads(out.read_text())
    assert len(data) == len(recs) and all(r["image"].startswith("val2017/") for r in data)
    assert all((coco_root / r["image"]).is_file() for r in data)
    code, _, err = run(capsys, "export", good, "--out", out, "--mix", "none", "--image-folder", tmp_path,
                        "--images-dir", coco_root / "val2017")
    assert_user_error(code, err, "outside --image-folder")


def test_unparsed_generation_rejects_are_read_not_refused(capsys, coco_root, tmp_path):
    # What `generate` writes when a completion does not parse: no conversations, raw text, stored reasons.
    unparsed = {"id": "000000000802", "image": "000000000802.jpg", "split": "reasoning", "reject_reasons": ["truncated"],
                "detail": "0 complete question/answer pairs, need 1", "context": "A kitchen.", "raw": "Question: Why?\nAnswer: The oven"}
    parsed = {"id": "000000000139", "image": "000000000139.jpg", "split": "reasoning", "reject_reasons": ["source_leak"],
              "conversations": conv("<image>\nWhy?", "As the caption says, a woman stands at the table near the window in a bright dining room.")}
    src = write_jsonl(tmp_path / "reasoning.rejects.jsonl", [unparsed, parsed])
    rej = tmp_path / "again.jsonl"
    summary = json.loads(run(capsys, "check", src, "--json", "--out-rejected", rej)[1])
    assert summary["rejected"] == 2 and summary["reject_reasons"] == {"truncated": 1, "source_leak": 1}
    assert read_jsonl(rej)[0] == unparsed
    stats = json.loads(run(capsys, "stats", src, "--json")[1])["reasoning"]
    assert stats["samples"] == 2 and stats["rejected"] == 2 and stats["turns_per_sample"]["mean"] == 2.0
    code, out, _ = run(capsys, "review", src, "--coco-root", coco_root)
    assert code == 0 and "Raw completion (did not parse)" in out and "Answer: The oven" in out
    assert "truncated (stored with the sample)" in out


def test_interactive_pager_moves_and_quits(coco_root):
    import io

    from rich.console import Console

    from datagen.quality import QualityConfig
    from datagen.quality.gate import open_lookup
    from datagen.quality.review import page_terminal, review_items

    items = list(review_items(GOOD, open_lookup(coco_root, "val2017"), QualityConfig()))[:4]
    console = Console(file=io.StringIO(), width=120)
    keys = iter(["", "", "p", "4", "q"])  # next, next, back, jump to 4, quit
    console.input = lambda prompt="": next(keys)
    page_terminal(items, console, interactive=True)
    shown = [line for line in console.file.getvalue().splitlines() if "in file  id" in line]
    assert [line.split("/")[0].strip("╭─ ") for line in shown] == ["1", "2", "3", "2", "4"]


def test_check_on_llava_mix_layout(capsys, coco_root, tmp_path):
    # LLaVA-1.5's mix: image paths under dataset folders, images from other datasets, text-only samples.
    records = [
        {"id": "000000030752", "image": "coco/train2017/000000030752.jpg",
         "conversations": conv("<image>\nWhat is the man doing?", "He is cross country skiing with his dog.")},
        {"id": "2354786", "image": "gqa/images/2354786.jpg",
         "conversations": conv("<image>\nIs the sky blue?", "Yes.")},
        {"id": 17, "conversations": conv("Write a haiku about snow.", "Soft snow on the pines, quiet steps fade into white, the valley sleeps on.")},
    ]
    src = tmp_path / "llava_v1_5_mix.json"
    src.write_text(json.dumps(records))
    summary = json.loads(run(capsys, "check", src, "--coco-root", coco_root, "--coco-split", "train2017", "--json")[1])
    assert summary["accepted"] == 3 and summary["images_not_in_coco"] == 1
    assert summary["chair"]["samples"] == 1  # only the COCO image is object-checked
