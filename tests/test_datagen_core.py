"""COCO reading, context rendering, prompt assembly and completion parsing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from datagen.coco import CocoIndex, ImageRecord, ObjectBox
from datagen.context import normalised_box, render_context
from datagen.errors import VisinstructError
from datagen.parse import ParseError, build_sample, split_qa
from datagen.prompts import SPLITS, load_instructions, load_prompt_set, pick_instruction
from datagen.sample import Sample


def make_record(objects=(), captions=("A cat on a mat.", "A small cat.")) -> ImageRecord:
    return ImageRecord(id=7, file_name="000000000007.jpg", width=640, height=480, captions=list(captions), objects=list(objects))


# --- context -------------------------------------------------------------------------------------

def test_normalised_box_rounds_to_three_decimals_and_prints_like_python():
    box = ObjectBox(category="cat", bbox=(64.0, 48.0, 576.0, 432.0))
    assert normalised_box(box, 640, 480) == [0.1, 0.1, 1.0, 1.0]
    odd = ObjectBox(category="dog", bbox=(1.0, 2.0, 3.0, 4.0))
    assert normalised_box(odd, 640, 480) == [0.002, 0.004, 0.006, 0.013]


def test_context_with_boxes_keeps_annotation_order_and_crowd_boxes():
    rec = make_record([
        ObjectBox(category="person", bbox=(0, 0, 320, 240)),
        ObjectBox(category="cat", bbox=(320, 240, 320, 240), iscrowd=True),
        ObjectBox(category="person", bbox=(10, 10, 10, 10)),
    ])
    text = render_context(rec, with_boxes=True)
    assert text == (
        "A cat on a mat.\nA small cat.\n\n"
        "person: [0.0, 0.0, 0.5, 0.5]\n"
        "cat: [0.5, 0.5, 1.0, 1.0]\n"
        "person: [0.016, 0.021, 0.031, 0.042]"
    )


def test_context_without_boxes_or_with_no_objects_is_captions_only():
    rec = make_record([ObjectBox(category="cat", bbox=(0, 0, 1, 1))])
    assert render_context(rec, with_boxes=False) == "A cat on a mat.\nA small cat."
    assert render_context(make_record(), with_boxes=True) == "A cat on a mat.\nA small cat."


def test_render_matches_llava_form_on_real_coco(coco_root):
    index = CocoIndex(coco_root, "val2017")
    rec = index.record(397133)
    text = render_context(rec, with_boxes=True)
    captions_part, boxes_part = text.split("\n\n")
    raw = json.loads((coco_root / "annotations" / "captions_val2017.json").read_text())
    expected_caps = [a["caption"].strip() for a in raw["annotations"] if a["image_id"] == 397133]
    assert captions_part.splitlines() == expected_caps
    inst = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    anns = [a for a in inst["annotations"] if a["image_id"] == 397133]
    lines = boxes_part.splitlines()
    assert len(lines) == len(anns)
    for line, ann in zip(lines, anns):
        x, y, w, h = ann["bbox"]
        coords = [round(x / 640, 3), round(y / 427, 3), round((x + w) / 640, 3), round((y + h) / 427, 3)]
        assert line == f"{names[ann['category_id']]}: {coords}"


# --- COCO reading --------------------------------------------------------------------------------

def test_coco_index_reads_all_captioned_images(coco_root):
    index = CocoIndex(coco_root, "val2017")
    ids = index.image_ids()
    assert len(ids) == 79 and ids == sorted(ids)
    records = list(index.records(limit=5))
    assert [r.id for r in records] == ids[:5]
    assert all(len(r.captions) == 5 for r in records)
    assert all((index.image_dir / r.file_name).is_file() for r in records)
    total_boxes = sum(len(r.objects) for r in index.records())
    assert total_boxes == 624


def test_coco_errors_are_user_errors(tmp_path, coco_root):
    with pytest.raises(VisinstructError, match="COCO root not found"):
        CocoIndex(tmp_path / "nope", "val2017")
    with pytest.raises(VisinstructError, match="annotation file not found"):
        CocoIndex(coco_root, "test2017")
    with pytest.raises(VisinstructError, match="no captions"):
        CocoIndex(coco_root, "val2017").record(123456789)
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "captions_val2017.json").write_text("{not json")
    with pytest.raises(VisinstructError, match="malformed COCO JSON"):
        CocoIndex(bad, "val2017", with_instances=False)


# --- prompts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", SPLITS)
def test_prompt_sets_have_system_and_fewshot_pairs(prompts_dir, split):
    ps = load_prompt_set(prompts_dir, split)
    assert 2 <= len(ps.examples) <= 3
    msgs = ps.messages("CONTEXT")
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "CONTEXT"}
    roles = [m["role"] for m in msgs[1:-1]]
    assert roles == ["user", "assistant"] * len(ps.examples)
    lowered = ps.system.lower()
    assert "never mention" in lowered and "caption" in lowered


def test_prompt_hash_changes_only_with_the_files(tmp_path, prompts_dir):
    import shutil

    copy = tmp_path / "prompts"
    shutil.copytree(prompts_dir, copy)
    before = {s: load_prompt_set(copy, s).hash for s in SPLITS}
    (copy / "reasoning" / "system.md").write_text("Edited system message.")
    after = {s: load_prompt_set(copy, s).hash for s in SPLITS}
    assert after["reasoning"] != before["reasoning"]
    assert after["conversation"] == before["conversation"] and after["detail"] == before["detail"]


def test_instruction_lists_and_deterministic_choice(prompts_dir):
    detail = load_instructions(prompts_dir, "detail")
    brief = load_instructions(prompts_dir, "brief")
    assert 12 <= len(detail) <= 20 and 8 <= len(brief) <= 14
    picks = {pick_instruction(detail, i, seed=0) for i in range(200)}
    assert len(picks) > 5
    assert pick_instruction(detail, 42, 0) == pick_instruction(detail, 42, 0)


# --- parsing -------------------------------------------------------------------------------------

def _sample(split, text, truncated=False, instruction=None):
    return build_sample(split=split, text=text, sample_id="000000000007", image="000000000007.jpg",
                        instruction=instruction, meta={"model": "m"}, truncated=truncated)


def test_parse_conversation_into_alternating_turns():
    text = "Question: What animal is it?\nAnswer: A cat.\n\n**Question:** Where is it?\n**Answer:** On a mat, near the door."
    s = _sample("conversation", text)
    values = [t.value for t in s.conversations]
    assert values == ["<image>\nWhat animal is it?", "A cat.", "Where is it?", "On a mat, near the door."]
    assert [t.speaker for t in s.conversations] == ["human", "gpt", "human", "gpt"]
    record = s.to_record()
    assert record["conversations"][0]["from"] == "human" and record["split"] == "conversation"
    Sample.model_validate(record)


def test_parse_multiline_answers_and_numbered_labels():
    blocks = split_qa("1. Question: Why?\nAnswer: Because\nit rains.\n2. Q: And?\nA: Done.")
    assert blocks == [("q", "Why?"), ("a", "Because\nit rains."), ("q", "And?"), ("a", "Done.")]


@pytest.mark.parametrize(
    ("split", "text", "truncated", "code"),
    [
        ("conversation", "", False, "empty_output"),
        ("conversation", "The image shows a cat.", False, "no_qa_format"),
        ("conversation", "Question: What?\nAnswer: A cat.", False, "too_few_turns"),
        ("conversation", "Answer: A cat.\nQuestion: What?", False, "unbalanced_turns"),
        ("conversation", "Question: A?\nAnswer: \nQuestion: B?\nAnswer: b.", False, "empty_turn"),
        ("reasoning", "Question: Why is the cat there?", False, "unbalanced_turns"),
        ("reasoning", "Question: Why is the cat there?\nAnswer: Because it is warm and", True, "truncated"),
        ("detail", "A cat sits on a mat and", True, "truncated"),
        ("detail", "Question: What?\nAnswer: A cat.", False, "wrong_format"),
    ],
)
def test_parse_rejects_broken_outputs_with_a_code(split, text, truncated, code):
    with pytest.raises(ParseError) as info:
        _sample(split, text, truncated, instruction="Describe the image.")
    assert info.value.code == code


def test_parse_truncated_conversation_drops_the_cut_pair():
    text = "Question: A?\nAnswer: a.\nQuestion: B?\nAnswer: b.\nQuestion: C?\nAnswer: c is cut"
    s = _sample("conversation", text, truncated=True)
    assert len(s.conversations) == 4


def test_parse_reasoning_and_detail():
    r = _sample("reasoning", "Question: Why is the cat on the mat?\nAnswer: It is warm there.")
    assert [t.value for t in r.conversations] == ["<image>\nWhy is the cat on the mat?", "It is warm there."]
    d = _sample("detail", "Description: A cat rests on a striped mat.", instruction="Describe this image in detail.")
    assert [t.value for t in d.conversations] == ["<image>\nDescribe this image in detail.", "A cat rests on a striped mat."]


def test_parse_strips_stray_image_tokens_from_model_text():
    s = _sample("reasoning", "Question: <image> What is it?\nAnswer: A cat <image>.")
    assert s.conversations[0].value == "<image>\nWhat is it?"
    assert "<image>" not in s.conversations[1].value


def test_sample_schema_rejects_bad_structure():
    good = {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    Sample.model_validate(good)
    for broken in (
        [{"from": "gpt", "value": "A"}, {"from": "human", "value": "<image>\nQ"}],
        [{"from": "human", "value": "Q <image>"}, {"from": "gpt", "value": "A"}],
        [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": " "}],
        [{"from": "human", "value": "<image>\nQ"}],
    ):
        with pytest.raises(ValueError):
            Sample.model_validate({**good, "conversations": broken})
