"""POPE builder and scorer on hand-built annotations; CHAIR and the contamination guard's id rules."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from datagen.coco import ImageRecord, ObjectBox
from datagen.errors import VisinstructError
from train.eval.chair import chair_of, chair_scores
from train.eval.contamination import guard, image_id_of, training_images
from train.eval.pope import SAMPLINGS, CocoObjects, build_pope, parse_yes_no, score_pope

CATEGORIES = ["person", "dog", "cat", "car", "bicycle", "chair", "dining table", "cup", "tv", "bus", "kite", "horse"]
# Hand-built: "person" is everywhere, "car" and "chair" common; "dog" co-occurs with "frisbee"-like pairs.
IMAGES = {
    1: ["person", "dog", "cat", "car"],
    2: ["person", "car", "bicycle", "bus"],
    3: ["person", "chair", "dining table", "cup"],
    4: ["person", "chair", "dining table", "tv"],
    5: ["person", "car", "bus", "bicycle"],
    6: ["dog", "cat", "chair"],
    7: ["person", "kite"],
    8: ["person", "chair", "cup", "tv"],
    9: ["horse", "person", "car"],
}


def write_instances(path: Path, images: dict[int, list[str]] = IMAGES) -> Path:
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(CATEGORIES)]
    ids = {n: k + 1 for k, n in enumerate(CATEGORIES)}
    anns = [{"id": 100 * i + j, "image_id": i, "category_id": ids[n], "bbox": [0, 0, 5, 5], "iscrowd": 0}
            for i, names in images.items() for j, n in enumerate(names)]
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 10, "height": 10} for i in images],
                                "annotations": anns, "categories": cats}))
    return path


@pytest.fixture()
def objects(tmp_path: Path) -> CocoObjects:
    return CocoObjects.from_instances(write_instances(tmp_path / "instances.json"))


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_ground_truth_balance_and_eligibility(objects: CocoObjects, sampling: str) -> None:
    questions = build_pope(objects, sampling, per_image=3)
    assert {q.image_id for q in questions} == {i for i, c in IMAGES.items() if len(c) >= 3}  # image 7 has 2
    for q in questions:  # every question's label is right for its image
        assert (q.category in IMAGES[q.image_id]) == (q.label == "yes")
        assert q.question == f"Is there a {q.category} in the image?"
    per_image = Counter((q.image_id, q.label) for q in questions)
    assert set(per_image.values()) == {3}  # 3 yes and 3 no for every image: 50/50 overall
    assert len({(q.image_id, q.category) for q in questions}) == len(questions)  # no category asked twice


def test_samplings_differ_as_the_paper_says(objects: CocoObjects) -> None:
    popular = build_pope(objects, "popular")
    freq = objects.frequency()
    for image_id in {q.image_id for q in popular}:
        negatives = {q.category for q in popular if q.image_id == image_id and q.label == "no"}
        absent = [c for c in freq if c not in IMAGES[image_id]]
        top = sorted(absent, key=lambda c: (-freq[c], c))[:3]
        assert negatives == set(top)  # the most frequent absent categories
    # Image 6 (dog, cat, chair): person is the most frequent category and absent, so popular asks it.
    assert "person" in {q.category for q in popular if q.image_id == 6 and q.label == "no"}
    adversarial = build_pope(objects, "adversarial")
    co = objects.co_occurrence()
    for image_id in {q.image_id for q in adversarial}:
        negatives = {q.category for q in adversarial if q.image_id == image_id and q.label == "no"}
        together = Counter()
        for c in IMAGES[image_id]:
            together.update(co[c])
        ranked = sorted((c for c in together if c not in IMAGES[image_id]), key=lambda c: (-together[c], c))
        assert negatives == set(ranked[:3])  # the categories co-occurring most with the image's own
    # Image 3 (person, chair, dining table, cup): tv co-occurs with chair/table/cup/person in 4 and 8.
    assert "tv" in {q.category for q in adversarial if q.image_id == 3 and q.label == "no"}
    random_neg = {(q.image_id, q.category) for q in build_pope(objects, "random") if q.label == "no"}
    assert random_neg != {(q.image_id, q.category) for q in popular if q.label == "no"}


def test_seed_determinism_and_image_limit(objects: CocoObjects) -> None:
    a = build_pope(objects, "random", max_images=4, seed=7)
    assert a == build_pope(objects, "random", max_images=4, seed=7)
    assert len({q.image_id for q in a}) == 4
    assert any(build_pope(objects, "random", max_images=4, seed=s) != a for s in range(8, 12))
    # The three samplings ask about the same images (only the negatives differ).
    assert {q.image_id for q in build_pope(objects, "adversarial", max_images=4, seed=7)} == {q.image_id for q in a}


def test_unknown_sampling_and_bad_file(objects: CocoObjects, tmp_path: Path) -> None:
    with pytest.raises(VisinstructError):
        build_pope(objects, "frequent")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(VisinstructError, match="not a COCO instances file"):
        CocoObjects.from_instances(bad)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(1, 500), st.sets(st.sampled_from(CATEGORIES), min_size=1, max_size=10), min_size=1, max_size=25),
       st.sampled_from(SAMPLINGS), st.integers(1, 4), st.integers(0, 3))
def test_generated_annotations_always_balanced_and_right(tmp_path_factory, images, sampling, per_image, seed) -> None:
    path = write_instances(tmp_path_factory.mktemp("pope") / "i.json", {i: sorted(c) for i, c in images.items()})
    objects = CocoObjects.from_instances(path)
    questions = build_pope(objects, sampling, per_image=per_image, seed=seed)
    labels = Counter(q.label for q in questions)
    assert labels["yes"] == labels["no"]
    for q in questions:
        assert (q.category in images[q.image_id]) == (q.label == "yes")
    assert all(len(images[q.image_id]) >= per_image for q in questions)


@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, there is a dog in the image.", "yes"), ("There is a dog.", "yes"),
    ("No", "no"), ("no.", "no"), ("No, there is no dog.", "no"), ("There is not a dog in the image.", "no"),
    ("There isn't a dog.", "no"), ("I don't see one.", "no"), ("Yes. There is no cat though.", "yes"),
    ("", "yes"), ("NO", "no"), ("Nope", "yes"),  # POPE's rule: anything without a negative word is a yes
])
def test_answer_parser(answer: str, parsed: str) -> None:
    assert parse_yes_no(answer) == parsed


def test_scorer_against_hand_computed_confusion() -> None:
    labels = ["yes"] * 6 + ["no"] * 4
    preds = ["yes", "yes", "yes", "yes", "no", "no", "yes", "no", "no", "no"]
    score = score_pope(labels, preds)
    assert (score.tp, score.fn, score.fp, score.tn) == (4, 2, 1, 3)
    d = score.as_dict()
    assert d["accuracy"] == pytest.approx(7 / 10)
    assert d["precision"] == pytest.approx(4 / 5)
    assert d["recall"] == pytest.approx(4 / 6)
    assert d["f1"] == pytest.approx(2 * 0.8 * (2 / 3) / (0.8 + 2 / 3))
    assert d["yes_ratio"] == pytest.approx(5 / 10)
    none_yes = score_pope(["yes", "no"], ["no", "no"]).as_dict()
    assert none_yes["precision"] is None and none_yes["recall"] == 0.0 and none_yes["yes_ratio"] == 0.0


def test_chair_uses_boxes_and_captions_as_truth() -> None:
    record = ImageRecord(id=5, file_name="x.jpg", width=10, height=10, captions=["A man rides a bike past a bus."],
                         objects=[ObjectBox(category="person", bbox=(0, 0, 1, 1)), ObjectBox(category="bicycle", bbox=(0, 0, 1, 1))])
    item = chair_of(record, "A man on a bicycle next to a bus and a dog. There is no cat. It might be a horse.")
    assert item.mentioned == {"person", "bicycle", "bus", "dog", "horse"}  # negated cat names nothing; hedged horse counts
    assert item.hallucinated == {"dog", "horse"}  # bus is in the captions, so it is there
    scores, _ = chair_scores([record, record], ["A man on a bicycle.", "A dog."])
    assert scores["chair_i"] == pytest.approx(1 / 3) and scores["chair_s"] == pytest.approx(1 / 2)


def test_image_ids_across_coco_names() -> None:
    assert image_id_of("COCO_val2014_000000391895.jpg") == 391895 == image_id_of("000000391895.jpg")
    assert image_id_of("000000391895") == 391895 and image_id_of("no-digits.jpg") is None


def test_guard_reads_training_data_named_by_the_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"id": "a", "image": "COCO_train2014_000000000009.jpg",
                                                               "conversations": []}) + "\n")
    stage = tmp_path / "runs" / "x" / "stage2"
    stage.mkdir(parents=True)
    (stage / "config.yaml").write_text("stage2:\n  data: [data/train.jsonl]\n")
    (tmp_path / "runs" / "x" / "final").mkdir()
    ckpt = tmp_path / "runs" / "x" / "final"
    assert training_images(ckpt).ids == {9}
    with pytest.raises(VisinstructError, match="1 of 3 pope images were used in training"):
        guard([1, 9, 12], ckpt, drop=False, what="pope")
    assert guard([1, 9, 12], ckpt, drop=True, what="pope")[:2] == ([1, 12], 1)
    # A data report with image ids (what the trainer should write) wins over re-reading the data.
    (stage / "data_report.json").write_text(json.dumps({"image_ids": ["000000000012.jpg"]}))
    assert training_images(ckpt).ids == {12}
    (stage / "data_report.json").unlink()
    (tmp_path / "data" / "train.jsonl").unlink()
    with pytest.raises(VisinstructError, match="are gone"):
        guard([1], ckpt, drop=True, what="pope")


def test_stage_export_ignores_later_stages(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for n, name in ((1, "COCO_train2014_000000000001.jpg"), (2, "000000000002.jpg")):
        (tmp_path / f"d{n}.jsonl").write_text(json.dumps({"image": name, "conversations": []}) + "\n")
        stage = tmp_path / "run" / f"stage{n}"
        stage.mkdir(parents=True)
        (stage / "config.yaml").write_text(f"stage1:\n  data: [d1.jsonl]\nstage2:\n  data: [d{n}.jsonl]\n")
    (tmp_path / "run" / "stage1" / "final").mkdir()
    (tmp_path / "run" / "final").mkdir()
    assert training_images(tmp_path / "run" / "stage1" / "final").ids == {1}
    assert training_images(tmp_path / "run" / "final").ids == {1, 2}
