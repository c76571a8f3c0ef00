"""Quality checks: each reason code on a faithful and a faulty sample, objects/CHAIR, near-duplicates, config."""
from __future__ import annotations

import json

import pytest

from datagen.backends.base import Completion
from datagen.coco import ImageRecord, ObjectBox
from datagen.errors import VisinstructError
from datagen.quality import QualityChecker, QualityConfig, SampleView, load_config, make_checker
from datagen.quality.checks import REASON_CODES
from datagen.quality.minhash import NearDuplicateIndex, jaccard, shingles
from datagen.quality.objects import ChairCounter, default_matcher, ground_truth
from datagen.sample import Sample

KITCHEN = ImageRecord(
    id=802, file_name="000000000802.jpg", width=424, height=640,
    captions=["A kitchen with a refrigerator, stove and oven with cabinets.",
              "A white oven and a white refrigerator are in the kitchen."],
    objects=[ObjectBox(category="refrigerator", bbox=(245, 185, 166, 356)),
             ObjectBox(category="oven", bbox=(33, 289, 127, 231))],
)
GOOD_DETAIL = ("The image shows a bright kitchen with white appliances. A tall refrigerator stands on the right, "
               "and a white oven sits on the left below wooden cabinets. The room looks clean and ready for cooking.")


def sample(*turns: str, split: str | None = "conversation", speakers: list[str] | None = None, image: str = "x.jpg",
           finish_reason: str | None = None, record: ImageRecord | None = None, key: str = "s1") -> SampleView:
    speakers = speakers or ["human" if i % 2 == 0 else "gpt" for i in range(len(turns))]
    return SampleView(key=key, turns=list(zip(speakers, turns)), split=split, has_image=bool(image),
                      finish_reason=finish_reason, record=record)


GOOD_CONV = ("<image>\nWhat appliances are in the kitchen?", "There is a white refrigerator and a white oven.",
             "What color are the cabinets?", "The cabinets are brown wood.")


def reasons(view: SampleView, **config) -> list[str]:
    return QualityChecker(QualityConfig(**config)).check(view).reasons


# Each code: a faulty sample that must trigger exactly it, next to the faithful one that must pass.
FAULTS = {
    "bad_roles": sample(*GOOD_CONV, speakers=["human", "gpt", "gpt", "human"]),
    "image_token": sample("What appliances are in the kitchen?\n<image>", *GOOD_CONV[1:]),
    "empty_turn": sample(GOOD_CONV[0], "  ", *GOOD_CONV[2:]),
    "source_leak": sample(GOOD_CONV[0], "The refrigerator box is at [0.578, 0.289, 0.969, 0.846].", *GOOD_CONV[2:]),
    "refusal": sample(GOOD_CONV[0], "I'm sorry, but I cannot see the image.", *GOOD_CONV[2:]),
    "ai_self_talk": sample(GOOD_CONV[0], "As an AI language model, I think there is a refrigerator.", *GOOD_CONV[2:]),
    "truncated": sample(*GOOD_CONV[:3], "The cabinets are made of brown wood and they look"),
    "too_short": sample("<image>\nDescribe the image in detail.", "A kitchen.", split="detail"),
    "too_long": sample("<image>\nDescribe the image in detail.", " ".join(["A white kitchen."] * 150), split="detail"),
    "repeated_question": sample(*GOOD_CONV, "What appliances are in the kitchen?", "A refrigerator and an oven."),
    "paraphrased_question": sample(*GOOD_CONV, "What color are the cabinets under the window?", "They are brown."),
    "subject_mismatch": sample("<image>\nWhat is the woman in the kitchen doing?", "The man is opening the oven.",
                               *GOOD_CONV[2:]),
    "self_reference": sample(GOOD_CONV[0], "As I mentioned earlier, there is a white refrigerator and a white oven.",
                             *GOOD_CONV[2:]),
    "hallucinated_object": sample(GOOD_CONV[0], "There is a white refrigerator, an oven and a sleeping cat.",
                                  *GOOD_CONV[2:], record=KITCHEN),
    "wrong_count": sample(GOOD_CONV[0], "There are two white refrigerators and an oven.", *GOOD_CONV[2:], record=KITCHEN),
    "wrong_position": sample(GOOD_CONV[0], "The refrigerator stands to the left of the oven.", *GOOD_CONV[2:],
                             record=KITCHEN),
    "absent_not_denied": SampleView(key="n1", split="negative", record=KITCHEN, absent_objects=["dog"], turns=[
        ("human", "<image>\nWhat is the dog eating?"), ("gpt", "The kitchen has a white refrigerator and a white oven.")]),
    "absent_object_named": SampleView(key="n2", split="negative", record=KITCHEN, absent_objects=["dog", "cat"], turns=[
        ("human", "<image>\nWhat is the dog eating?"),
        ("gpt", "There is no dog here, and no cat either; only a refrigerator and an oven.")]),
    "malformed_box": sample("<image>\nWhere is the oven?", "The oven [0.078, 0.452, 0.377, 0.813] is next to the "
                            "refrigerator [0.578, 0.289, 0.969].", split="grounded", record=KITCHEN),
    "invented_box": sample("<image>\nWhere is the oven?", "The oven [0.5, 0.1, 0.6, 0.2] is white.", split="grounded",
                           record=KITCHEN),
    "no_box": sample("<image>\nWhere is the oven?", "The oven is on the left side of the kitchen.", split="grounded"),
    "bad_image_path": SampleView(key="p1", turns=list(zip(["human", "gpt"] * 2, GOOD_CONV)), image="../../etc/passwd"),
}


def test_faithful_samples_pass_every_check():
    assert reasons(sample(*GOOD_CONV, record=KITCHEN)) == []
    assert reasons(sample("<image>\nDescribe the image in detail.", GOOD_DETAIL, split="detail", record=KITCHEN)) == []
    # LLaVA's short chat answers need no final period.
    assert reasons(sample("<image>\nHow many ovens?", "One", "Is it white?", "Yes")) == []


@pytest.mark.parametrize("code", sorted(FAULTS))
def test_each_reason_code_fires_on_its_fault(code):
    assert reasons(FAULTS[code]) == [code]


def test_every_registered_code_has_a_test():
    assert set(FAULTS) | {"near_duplicate"} == set(REASON_CODES)


@pytest.mark.parametrize(
    ("turns", "speakers", "expected"),
    [
        (("<image>\nQ?", "A."), ["gpt", "human"], "bad_roles"),
        (("<image>\nQ?",), None, "bad_roles"),
        (("<image>\nQ?", "A.", "Q2?"), None, "bad_roles"),
        (("<image>\nQ?", "A.", "Q2?", "A2."), ["human", "gpt", "user", "gpt"], "bad_roles"),
        (("<image>\nQ?", "A <image> here."), None, "image_token"),
        (("<image>\n<image>\nQ?", "A."), None, "image_token"),
        (("Q?", "A."), None, "image_token"),
        (("<image>", "A."), None, "empty_turn"),
    ],
)
def test_structure_faults(turns, speakers, expected):
    assert expected in reasons(sample(*turns, speakers=speakers))


def test_image_token_at_end_is_accepted_only_when_configured():
    view = sample("What is this?\n<image>", "A white kitchen.")
    assert reasons(view) == ["image_token"]
    assert reasons(view, image_token_position="start_or_end") == []
    assert reasons(sample("What is this?", "A kitchen.", image="")) == []  # text-only sample needs no <image>
    assert reasons(sample("<image>\nWhat is this?", "A kitchen.", image="")) == ["image_token"]


@pytest.mark.parametrize(
    "answer",
    [
        "As the caption says, the kitchen is white.",
        "According to the descriptions, there is an oven.",
        "The bounding box of the oven is on the left.",
        "Its coordinates show it on the left.",
        "The oven spans from 0.078 to 0.377 horizontally.",
        "The oven sits at [0.08, 0.45] in the picture.",
        "Based on the given information, the kitchen is white.",
        "As described in the text, the kitchen is white.",
    ],
)
def test_source_leaks(answer):
    assert reasons(sample("<image>\nWhat is in the kitchen?", answer)) == ["source_leak"]


@pytest.mark.parametrize(
    "answer",
    ["The oven is 0.5 meters wide.", "There are 2 boxes of cereal on the counter.", "The sign reads 3.50 dollars.",
     "A cardboard box sits by the door."],
)
def test_ordinary_numbers_and_boxes_are_not_leaks(answer):
    assert reasons(sample("<image>\nWhat is in the kitchen?", answer)) == []


def test_caption_word_in_an_instruction_is_not_a_leak():
    view = sample("<image>\nGive a short caption for this photo.", "A white kitchen with a refrigerator.", split="captions")
    assert reasons(view) == []


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ("I am unable to view the image you provided.", "refusal"),
        ("I apologize, but there is no image attached.", "refusal"),
        ("I can't determine what is in the picture.", "refusal"),
        ("I'm not able to see the picture you shared.", "refusal"),
        ("I’m unable to describe it.", "refusal"),
        ("Sure! Here are the questions and answers about the kitchen.", "ai_self_talk"),
        ("I'm an AI and cannot see, but kitchens have ovens.", "ai_self_talk"),
        ("The kitchen is white. Let me know if you have other questions!", "ai_self_talk"),
    ],
)
def test_refusal_and_self_talk(answer, code):
    assert code in reasons(sample("<image>\nWhat is in the kitchen?", answer))


def test_truncation_by_finish_reason_and_cut_sentences():
    assert reasons(sample(*GOOD_CONV, finish_reason="length")) == ["truncated"]
    assert reasons(sample(*GOOD_CONV, finish_reason="length"), truncate_on_finish_length=False) == []
    assert reasons(sample(*GOOD_CONV, finish_reason="stop")) == []
    assert reasons(sample(*GOOD_CONV[:3], "The cabinets are brown,")) == ["truncated"]
    assert reasons(sample(*GOOD_CONV[:3], "Brown wood with a")) == ["truncated"]
    assert reasons(sample(*GOOD_CONV[:3], "They are brown wood:\n- oak doors\n- steel handles")) == []
    # COCO captions often lack a final period; the captions split allows that.
    assert reasons(sample("<image>\nCaption this.", "A kitchen with a white refrigerator and oven", split="captions")) == []


def test_length_bounds_follow_the_split():
    answer = "A white kitchen with a refrigerator and an oven under brown cabinets."
    assert reasons(sample("<image>\nDescribe the image.", answer, split="detail")) == ["too_short"]
    assert reasons(sample("<image>\nDescribe the image.", answer, split="conversation")) == []
    long_question = "<image>\n" + " ".join(["why"] * 100) + "?"
    assert reasons(sample(long_question, "Because it is.", split="conversation")) == ["too_long"]


def test_repeated_question_tolerates_different_questions():
    view = sample("<image>\nWhat color is the oven?", "It is white.", "What color is the refrigerator?", "It is white too.")
    assert reasons(view) == []
    view = sample("<image>\nWhat color is the oven?", "It is white.", "what colour is the oven", "White.")
    assert reasons(view, repeated_question_similarity=0.6) == ["repeated_question"]


# --- objects, synonyms, CHAIR ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two men are talking.", {"person"}),
        ("A child holds a kitten.", {"person", "cat"}),
        ("A couch next to a sofa.", {"couch"}),
        ("The sofas are grey.", {"couch"}),
        ("A hot dog on a plate.", {"hot dog"}),
        ("A teddy bear on the bed.", {"teddy bear", "bed"}),
        ("Knives and forks on the table.", {"knife", "fork", "dining table"}),
        ("Several buses wait.", {"bus"}),
        ("People wait at the bus stop.", {"person"}),
        ("A woman in an orange shirt.", {"person"}),
        ("An orange and white cat.", {"cat"}),
        ("An orange sits on the plate.", {"orange"}),
        ("The man's cellphone rings.", {"person", "cell phone"}),
        ("There is no dog in the yard.", set()),
        ("The kitchen has no people in it, but a fridge.", {"refrigerator"}),
        ("A pit bull dog on a bed.", {"dog", "bed"}),
    ],
)
def test_synonyms_plurals_and_negation(text, expected):
    assert default_matcher().categories(text) == expected


def test_every_coco_category_is_matched_by_its_own_name(coco_root):
    names = json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())["categories"]
    matcher = default_matcher()
    for category in (c["name"] for c in names):
        assert category in matcher.categories(f"There is a {category} here."), category


def test_ground_truth_joins_boxes_and_captions():
    assert ground_truth(KITCHEN, default_matcher()) == {"refrigerator", "oven"}


def test_chair_arithmetic_on_a_tiny_case():
    # Three samples: {a, b} all real; {a, c} with c hallucinated; {} names nothing.
    counter = ChairCounter()
    counter.add({"oven", "refrigerator"}, set())
    counter.add({"oven", "cat"}, {"cat"})
    counter.add(set(), set())
    assert (counter.mentioned, counter.hallucinated) == (4, 1)
    assert counter.chair_i == pytest.approx(1 / 4)
    assert counter.chair_s == pytest.approx(1 / 3)
    assert ChairCounter().chair_i is None


def test_hallucination_threshold_and_hedging():
    hedged = sample(GOOD_CONV[0], "Someone might keep a cat here, though the oven is the focus.", *GOOD_CONV[2:],
                    record=KITCHEN)
    assert reasons(hedged) == []
    assert reasons(hedged, count_hedged_mentions=True) == ["hallucinated_object"]
    assert reasons(FAULTS["hallucinated_object"], max_hallucinated_objects=1) == []
    report = QualityChecker().check(FAULTS["hallucinated_object"])
    assert report.hallucinated == {"cat"} and {"refrigerator", "oven", "cat"} <= report.mentioned


# --- near-duplicates -------------------------------------------------------------------------


def test_shingles_and_jaccard():
    assert shingles("A b c d", 2) == {"a b", "b c", "c d"}
    assert shingles("Hi", 3) == {"hi"}
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_minhash_finds_near_copies_and_not_different_texts():
    index = NearDuplicateIndex(threshold=0.8, shingle_size=2)
    assert index.add("a", GOOD_DETAIL) is None
    near = GOOD_DETAIL.replace("bright kitchen", "very bright kitchen")
    found = index.add("b", near)
    assert found is not None and found[0] == "a" and found[1] >= 0.8
    other = "A man rides a brown horse along a sandy beach while waves roll in behind him under a cloudy sky."
    assert index.add("c", other) is None


def test_near_duplicate_reason_only_for_later_copies():
    checker = QualityChecker()
    first = sample("<image>\nDescribe the image.", GOOD_DETAIL, split="detail", key="one")
    copy = sample("<image>\nWhat is shown?", GOOD_DETAIL.replace("tall", "big"), split="detail", key="two")
    assert checker.check(first).reasons == []
    report = checker.check(copy)
    assert report.reasons == ["near_duplicate"] and "one" in report.details["near_duplicate"]
    assert QualityChecker(QualityConfig(disabled_checks=["near_duplicate"])).check(copy).reasons == []


def test_rejected_samples_do_not_enter_the_duplicate_index():
    checker = QualityChecker()
    bad = sample("<image>\nDescribe the image.", GOOD_DETAIL + " As the caption says.", split="detail", key="bad")
    assert checker.check(bad).reasons == ["source_leak"]
    assert checker.check(sample("<image>\nDescribe.", GOOD_DETAIL, split="detail", key="ok")).reasons == []


# --- generation hook and config --------------------------------------------------------------


def test_make_checker_matches_the_job_hook():
    check = make_checker("conversation")
    good = Sample(id="000000000802", image="000000000802.jpg", split="conversation",
                  conversations=[{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(GOOD_CONV)])
    done = Completion(text="", finish_reason="stop", prompt_tokens=1, completion_tokens=1, model="m")
    assert check(good, KITCHEN, done) == []
    assert check(good, KITCHEN, done) == ["near_duplicate"]  # stateful across calls
    cut = Completion(text="", finish_reason="length", prompt_tokens=1, completion_tokens=1, model="m")
    assert "truncated" in make_checker("conversation")(good, KITCHEN, cut)
    blind = make_checker("conversation", coco_available=False)
    record = good.to_record()
    record["conversations"][1]["value"] = "A refrigerator, an oven and a cat."
    leaky = Sample.model_validate(record)
    assert blind(leaky, KITCHEN, done) == []
    assert make_checker("conversation")(leaky, KITCHEN, done) == ["hallucinated_object"]


def test_config_loads_yaml_and_json_and_keeps_other_defaults(tmp_path):
    yml = tmp_path / "q.yaml"
    yml.write_text("near_duplicate_threshold: 0.9\nlengths:\n  detail:\n    min_answer_words: 5\n")
    config = load_config(yml)
    assert config.near_duplicate_threshold == 0.9
    assert config.lengths["detail"].min_answer_words == 5 and config.lengths["detail"].max_answer_words == 400
    assert config.lengths["reasoning"].min_answer_words == 12
    js = tmp_path / "q.json"
    js.write_text(json.dumps({"disabled_checks": ["truncated"]}))
    assert load_config(js).disabled_checks == ["truncated"]
    assert load_config(None) == QualityConfig()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("near_duplicate_threshold: 2\n", "near_duplicate_threshold"), ("nonsense_field: 1\n", "nonsense_field"),
     ("a: [\n", "not valid"), ("- 1\n- 2\n", "must be a mapping")],
)
def test_bad_config_is_a_user_error(tmp_path, content, fragment):
    path = tmp_path / "q.yaml"
    path.write_text(content)
    with pytest.raises(VisinstructError, match=fragment):
        load_config(path)


def test_unknown_disabled_check_is_a_user_error():
    with pytest.raises(VisinstructError, match="unknown check"):
        QualityChecker(QualityConfig(disabled_checks=["spelling"]))
