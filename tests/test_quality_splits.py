"""The negative and grounded splits' contexts, and the checks that deny, ground, count and place."""
from __future__ import annotations

import pickle
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datagen.backends.base import Completion, SamplingParams
from datagen.coco import CocoIndex, ImageRecord, ObjectBox
from datagen.context import (
    ContextBuilder, CooccurrenceTable, absent_from_context, context_builder, pick_absent_objects, render_context,
)
from datagen.errors import VisinstructError
from datagen.prompts import default_prompts_dir, load_prompt_set
from datagen.task import Accepted, LlavaTask
from datagen.quality import QualityChecker, QualityConfig, SampleView
from datagen.quality.counting import count_claims, position_claims
from datagen.quality.generic import asserted_categories
from datagen.quality.grounding import iou, parse_boxes
from datagen.quality.negation import answer_denies
from datagen.quality.objects import default_matcher, ground_truth

M = default_matcher()
# 640 x 480: boxes [x, y, w, h] in pixels.
PARK = ImageRecord(
    id=7, file_name="7.jpg", width=640, height=480,
    captions=["Two dogs play on the grass near a bench.", "A park with dogs and a bench."],
    objects=[ObjectBox(category="dog", bbox=(64, 240, 128, 96)), ObjectBox(category="dog", bbox=(256, 240, 128, 96)),
             ObjectBox(category="bench", bbox=(448, 192, 160, 96)), ObjectBox(category="person", bbox=(0, 0, 10, 10)),
             ObjectBox(category="person", bbox=(20, 0, 10, 10)), ObjectBox(category="person", bbox=(40, 0, 10, 10))],
)


def check(turns: list[str], split: str, record: ImageRecord | None = PARK, absent: list[str] | None = None) -> dict:
    view = SampleView(key="k", turns=[("human" if i % 2 == 0 else "gpt", t) for i, t in enumerate(turns)], split=split,
                      record=record, absent_objects=absent or [])
    return QualityChecker(QualityConfig(disabled_checks=["near_duplicate"])).check(view).details


# --- absent objects and contexts --------------------------------------------------------------


def table() -> CooccurrenceTable:
    # 4 images: dog+bench, dog+bench+frisbee, dog+frisbee, cat+sofa.
    return CooccurrenceTable.from_image_categories(
        [{"dog", "bench"}, {"dog", "bench", "frisbee"}, {"dog", "frisbee"}, {"cat", "couch"}],
        ["dog", "bench", "frisbee", "cat", "couch", "person"])


def test_cooccurrence_counts_and_adversarial_order():
    t = table()
    assert t.together("dog", "bench") == 2 and t.together("bench", "dog") == 2 and t.singles["dog"] == 3
    # Present {bench}: P(dog|bench) = 2/2, P(frisbee|bench) = 1/2, cat/couch/person 0.
    assert pick_absent_objects({"bench"}, t, 2, seed=0, image_id=1) == ["dog", "frisbee"]
    # Present {dog}: bench 2/3 > frisbee 2/3? equal -> both before the zero-scored ones.
    assert set(pick_absent_objects({"dog"}, t, 2, seed=0, image_id=1)) == {"bench", "frisbee"}


@settings(max_examples=50, deadline=None)
@given(present=st.sets(st.sampled_from(["dog", "bench", "frisbee", "cat", "couch", "person"])),
       seed=st.integers(0, 5), image_id=st.integers(0, 10**6), count=st.integers(1, 6))
def test_absent_objects_are_never_present_and_sorted_by_score(present, seed, image_id, count):
    t = table()
    picked = pick_absent_objects(present, t, count, seed, image_id)
    assert not set(picked) & present and len(picked) == min(count, 6 - len(present))
    scores = [t.score(c, present) for c in picked]
    assert scores == sorted(scores, reverse=True)
    assert picked == pick_absent_objects(present, t, count, seed, image_id)  # deterministic for a seed


def test_captioned_objects_count_as_present(coco_root):
    index = CocoIndex(coco_root, "val2017")
    builder = context_builder("negative", index, seed=3)
    for image_id in index.image_ids()[:30]:
        record = index.record(image_id)
        absent = builder.absent_objects(record)
        assert len(absent) == 3 and not set(absent) & ground_truth(record, M)


def test_negative_context_is_the_boxes_context_plus_the_absent_line():
    builder = ContextBuilder("negative", table(), seed=0, absent_count=1, caption_categories=M.categories_of_each)
    text, meta = builder.render(PARK)
    # PARK holds dog, bench, person (boxes): frisbee scores P(frisbee|dog) + P(frisbee|bench) = 2/3 + 1/2;
    # cat and couch were never seen beside them (0).
    expected = ("Two dogs play on the grass near a bench.\nA park with dogs and a bench.\n\n"
                "dog: [0.1, 0.5, 0.3, 0.7]\ndog: [0.4, 0.5, 0.6, 0.7]\nbench: [0.7, 0.4, 0.95, 0.6]\n"
                "person: [0.0, 0.0, 0.016, 0.021]\nperson: [0.031, 0.0, 0.047, 0.021]\nperson: [0.062, 0.0, 0.078, 0.021]"
                "\n\nAbsent objects: frisbee")
    assert text == expected and meta == {"absent_objects": ["frisbee"]}
    assert absent_from_context(text) == ["frisbee"]
    # The zero-scored ties come in a per (seed, image) order: the same for a seed, and both orders occur.
    three = [ContextBuilder("negative", table(), seed=s, caption_categories=M.categories_of_each).absent_objects(PARK)
             for s in range(12)]
    assert all(t[0] == "frisbee" and set(t[1:]) == {"cat", "couch"} for t in three)
    assert len({tuple(t) for t in three}) == 2
    assert ContextBuilder("grounded").render(PARK)[0] == render_context(PARK, with_boxes=True)


def test_negative_without_cooccurrence_is_a_user_error():
    with pytest.raises(VisinstructError, match="co-occurrence"):
        ContextBuilder("negative")


def test_cooccurrence_from_a_given_file(coco_root, tmp_path):
    path = coco_root / "annotations" / "instances_train2017.json"
    builder = context_builder("negative", None, cooccurrence_from=path)
    assert builder.cooccurrence is not None and builder.cooccurrence.singles["person"] > 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(VisinstructError, match="not a COCO annotation file: no .annotations. list"):
        context_builder("negative", None, cooccurrence_from=bad)



def test_cooccurrence_from_the_compact_index_equals_the_instances_file(coco_root):
    """Counting over the mapped COCO index gives the same table as reading the JSON file."""
    from_index = CooccurrenceTable.from_coco(CocoIndex(coco_root, "val2017"))
    from_file = CooccurrenceTable.from_file(coco_root / "annotations" / "instances_val2017.json")
    assert from_index.singles and from_index.pairs
    assert (from_index.singles, from_index.pairs, from_index.categories) == (
        from_file.singles, from_file.pairs, from_file.categories)


def test_negative_task_pickles_with_its_context_and_keeps_absent_objects_in_meta(coco_root):
    """Ray workers get the task pickled: the same requests, and judged samples carry meta.absent_objects."""
    index = CocoIndex(coco_root, "val2017")
    task = LlavaTask("negative", load_prompt_set(default_prompts_dir(), "negative"), SamplingParams(seed=2),
                     context=context_builder("negative", index, seed=2))
    copy = pickle.loads(pickle.dumps(task))
    record = index.record(index.image_ids()[0])
    prepared, copied = task.prepare(record), copy.prepare(record)
    assert prepared.request.messages == copied.request.messages and prepared.context == copied.context
    absent = absent_from_context(prepared.context)
    assert len(absent) == 3
    answer = f"Question:\nIs there a {absent[0]} in the picture?\nAnswer:\nNo, there is no {absent[0]} in the image."
    verdict = copy.judge(prepared.subject, Completion(answer, "stop", 10, 10, "m"))
    sample = verdict.record if isinstance(verdict, Accepted) else verdict.base
    assert sample["meta"]["absent_objects"] == absent

# --- negation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "denied"), [
    ("There is no cat in this picture.", True),
    ("No cat can be seen; two dogs play on the grass.", True),
    ("The cat is not in the picture.", True),
    ("A cat isn't anywhere in the scene.", True),
    ("I don't see any cat here.", True),
    ("No, there isn't one here. Two dogs play on the grass.", True),
    ("The cat is grey and lies on the bench.", False),
    ("The cat is not asleep; it sits on the bench.", False),
    ("Two dogs play on the grass.", False),
    ("There is no cat here, but a cat sits on the bench.", False),
])
def test_answer_denies(answer, denied):
    assert answer_denies(answer, "cat", M)[0] is denied


def test_negative_split_checks():
    q = "<image>\nWhat colour is the cat on the bench?"
    assert check([q, "There is no cat in this picture. Two dogs play near the bench."], "negative", absent=["cat"]) == {}
    assert "absent_not_denied" in check([q, "The cat is black."], "negative", absent=["cat"])
    details = check([q, "There is no cat here, and no frisbee either."], "negative", absent=["cat", "frisbee"])
    assert list(details) == ["absent_object_named"] and "frisbee" in details["absent_object_named"]
    assert "no question asks" in check(["<image>\nWhat is on the bench?", "Nothing; the bench is empty."], "negative",
                                       absent=["cat"])["absent_not_denied"]
    # Without the meta list, objects not in the image's truth are the absent ones.
    assert check([q, "The cat is black."], "negative", absent=None)["absent_not_denied"]


# --- boxes ------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=4, max_size=4))
def test_boxes_round_trip_through_text(ints):
    x1, x2 = sorted(ints[:2])
    y1, y2 = sorted(ints[2:])
    box = [round(x1 / 1000, 3), round(y1 / 1000, 3), round(x2 / 1000, 3), round(y2 / 1000, 3)]
    parsed = parse_boxes(f"the dog {box} sleeps")
    assert len(parsed) == 1
    if x1 < x2 and y1 < y2:
        assert parsed[0].box == tuple(box) and iou(box, box) == pytest.approx(1.0)
    else:
        assert parsed[0].box is None and "x2 <= x1" in parsed[0].problem


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=8, max_size=8))
def test_iou_is_symmetric_and_bounded(v):
    a = (min(v[0], v[1]), min(v[2], v[3]), max(v[0], v[1]), max(v[2], v[3]))
    b = (min(v[4], v[5]), min(v[6], v[7]), max(v[4], v[5]), max(v[6], v[7]))
    assert 0.0 <= iou(a, b) == iou(b, a) <= 1.0 + 1e-9


def test_iou_by_hand():
    assert iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert iou((0, 0, 0.1, 0.1), (0.5, 0.5, 0.6, 0.6)) == 0.0


@pytest.mark.parametrize(("text", "problem"), [
    ("[0.1, 0.2, 0.3]", "not four numbers"), ("[0.1, 0.2, 1.3, 0.4]", "outside"),
    ("[0.1234, 0.2, 0.3, 0.4]", "decimals"), ("[0.5, 0.2, 0.3, 0.4]", "x2 <= x1"), ("[a1, 0.2, 0.3, 0.4]", "four"),
])
def test_malformed_boxes(text, problem):
    assert problem in parse_boxes(text)[0].problem


def test_grounded_checks_match_the_named_category():
    q = "<image>\nWhere are the dogs?"
    good = "The dog [0.1, 0.5, 0.3, 0.7] runs left of the other dog [0.4, 0.5, 0.6, 0.7]."
    assert check([q, good], "grounded") == {}
    # The region form: a box with no object named before it matches any annotated box.
    assert check(["<image>\nWhat is in the region [0.7, 0.4, 0.95, 0.6]?", "It is a wooden bench."], "grounded") == {}
    wrong = check([q, "The bench [0.1, 0.5, 0.3, 0.7] is empty."], "grounded")
    assert list(wrong) == ["invented_box"] and "no annotated bench box" in wrong["invented_box"]
    shifted = check([q, "The dog [0.15, 0.5, 0.45, 0.7] runs."], "grounded")
    assert "best IoU" in shifted["invented_box"]
    assert list(check([q, "The dogs run on the grass."], "grounded")) == ["no_box"]
    assert list(check([q, "The dogs [0.1, 0.5, 0.3] run on the grass."], "grounded")) == ["malformed_box", "no_box"]
    # Boxes are a source leak in every other split.
    assert "source_leak" in check([q, good], "conversation")


# --- counting and placement -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "claims"), [
    ("There are two dogs on the grass.", [("dog", 2, True)]),
    ("Three small brown dogs play.", [("dog", 3, False)]),
    ("I can see 2 dogs and a bench.", [("dog", 2, True)]),
    ("Several people walk by.", [("person", None, False)]),
    ("A pair of dogs plays.", [("dog", 2, False)]),
    ("One of the dogs is asleep.", []),
    ("Two of the dogs are asleep.", []),
    ("The dog is big.", []),
])
def test_count_claims(text, claims):
    assert [(c.category, c.count, c.whole) for c in count_claims(text, M)] == claims


@pytest.mark.parametrize(("answer", "wrong"), [
    ("There are two dogs on the grass.", False),
    ("Three dogs play on the grass.", True),
    ("There are two benches.", True),
    ("Several benches stand in the park.", True),
    ("A few dogs run around.", False),
    ("There is only one dog.", True),
    ("One dog chases the other.", False),  # a subset, not the total
    ("Three people are in the background.", False),
    ("Four people are in the background.", True),
])
def test_wrong_count(answer, wrong):
    assert ("wrong_count" in check(["<image>\nWhat is there?", answer], "conversation")) is wrong


def test_crowd_boxes_and_captions_tolerate_counts():
    crowd = PARK.model_copy(update={"objects": [*PARK.objects, ObjectBox(category="person", bbox=(0, 0, 50, 50), iscrowd=True)]})
    assert check(["<image>\nWho is there?", "Twelve people stand in the back."], "conversation", record=crowd) == {}
    captioned = PARK.model_copy(update={"captions": ["Four people and two dogs in a park."]})
    assert check(["<image>\nWho is there?", "Four people stand in the back."], "conversation", record=captioned) == {}


def test_position_claims_and_checks():
    assert [(c.first, c.relation, c.second) for c in position_claims("The bench is to the right of the frisbee.", M)] \
        == [("bench", "right", "frisbee")]
    record = ImageRecord(id=8, file_name="8.jpg", width=100, height=100, captions=["A cat and a bench."],
                         objects=[ObjectBox(category="cat", bbox=(0, 60, 20, 20)), ObjectBox(category="bench", bbox=(60, 10, 30, 20))])
    ok = ["The cat is to the left of the bench.", "The bench is on the right of the cat.", "The cat is below the bench.",
          "The bench is above the cat."]
    bad = ["The cat is to the right of the bench.", "The bench is left of the cat.", "The cat sits above the bench.",
           "The bench is under the cat."]
    for text in ok:
        assert check(["<image>\nWhere?", text], "conversation", record=record) == {}, text
    for text in bad:
        assert "wrong_position" in check(["<image>\nWhere?", text], "conversation", record=record), text
    # Two dogs: "the dog" is ambiguous, so no claim about it is checked.
    assert "wrong_position" not in check(["<image>\nWhere?", "The bench is to the left of the dog."], "conversation")


# --- the object check's leniency (the gate's, not CHAIR's) --------------------------------------


@pytest.mark.parametrize(("text", "asserted"), [
    ("The umbrella protects people from the sun.", {"umbrella"}),
    ("Such a spot is popular with tourists.", set()),
    ("The cloud looks like a horse.", set()),
    ("It is bigger than a car.", set()),
    ("The horse is not in the picture.", set()),
    ("Benches like these give people a place to rest.", set()),
    ("People are walking along the beach.", {"person"}),
    ("A horse stands in the field.", {"horse"}),
    ("Two people are chatting in the corner.", {"person"}),
    ("There is also a car in the background.", {"car"}),
])
def test_asserted_categories(text, asserted):
    assert asserted_categories(text, M, include_hedged=False) == asserted


def test_chair_keeps_the_standard_definition():
    """CHAIR (the matcher) counts a generic mention; only the gate forgives it."""
    text = "The red umbrella is open on the sand, where it protects people from the strong midday sun."
    assert M.categories(text, include_hedged=False) == {"person", "umbrella"}
    record = ImageRecord(id=9, file_name="9.jpg", width=10, height=10, captions=["A red umbrella on a beach."],
                         objects=[ObjectBox(category="umbrella", bbox=(0, 0, 5, 5))])
    view = SampleView(key="k", turns=[("human", "<image>\nWhat is it for?"), ("gpt", text)], split="reasoning", record=record)
    report = QualityChecker().check(view)
    assert report.accepted and report.hallucinated == {"person"}  # CHAIR still sees it
    strict = QualityChecker(QualityConfig(lenient_object_mentions=False)).check(view)
    assert strict.reasons == ["hallucinated_object"] and "person" in strict.details["hallucinated_object"]


def test_every_split_is_counted_in_the_registry():
    from datagen.splits import SPLITS

    assert Counter(SPLITS) == Counter(["conversation", "detail", "reasoning", "negative", "grounded"])


# --- review -----------------------------------------------------------------------------------


def test_review_shows_absent_objects_and_draws_text_boxes(coco_root, tmp_path):
    import json

    from rich.console import Console

    from datagen.quality.gate import open_lookup
    from datagen.quality.review import page_entry, review_items, sample_panel

    index = CocoIndex(coco_root, "val2017")
    record = index.record(index.image_ids()[0])
    obj = record.objects[0]
    from datagen.context import normalised_box

    box = normalised_box(obj, record.width, record.height)
    samples = [
        {"id": "g", "image": record.file_name, "split": "grounded", "conversations": [
            {"from": "human", "value": f"<image>\nWhat is the {obj.category} at {box} doing?"},
            {"from": "gpt", "value": f"The {obj.category} {box} stands still."}]},
        {"id": "n", "image": record.file_name, "split": "negative", "meta": {"absent_objects": ["giraffe", "zebra"]},
         "conversations": [{"from": "human", "value": "<image>\nWhat is the giraffe eating?"},
                           {"from": "gpt", "value": "There is no giraffe in this picture."}]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    lookup = open_lookup(coco_root, "val2017")
    grounded, negative = list(review_items(path, lookup, QualityConfig()))
    assert grounded.text_boxes == [(obj.category, tuple(box)), (obj.category, tuple(box))]
    entry = page_entry(grounded, lookup, tmp_path, embed=False)
    x, y, w, h = obj.bbox
    assert entry["textBoxes"][0][0] == obj.category
    assert entry["textBoxes"][0][1:] == pytest.approx([x, y, w, h], abs=record.width / 1000 + 0.1)
    assert page_entry(negative, lookup, tmp_path, embed=False)["absent"] == ["giraffe", "zebra"]
    console = Console(record=True, width=200)
    console.print(sample_panel(negative))
    console.print(sample_panel(grounded))
    text = console.export_text()
    assert "absent objects (asked about, must be denied): giraffe, zebra" in text
    assert f"box in the text: {obj.category} {box}" in text
