"""Masking property: labels are exactly the assistant answers (+ end-of-turn), for two chat templates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest_train import COCO, VICUNA_SYSTEM, coco_captions, smollm_tokenizer, vicuna_tokenizer
from model.errors import TrainError
from model.llava import IGNORE
from train.data import ConversationEncoder, DataReport, SampleSpec, prepare, read_records, to_messages

IMAGE = "<image>"


@pytest.fixture(scope="module")
def encoders() -> dict[str, ConversationEncoder]:
    return {"smollm2-chatml": ConversationEncoder(smollm_tokenizer()), "vicuna": ConversationEncoder(vicuna_tokenizer())}


def squash(text: str) -> str:
    return "".join(text.split())


def labelled_runs(labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, lab in enumerate(labels):
        if lab == IGNORE:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def check_labels(enc: ConversationEncoder, messages: list[dict[str, str]]) -> None:
    """Each labelled run decodes to one answer followed by the end-of-turn token, and nothing else trains."""
    tok = enc.tokenizer
    ids, labels = enc.encode(messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = labelled_runs(labels)
    assert len(runs) == len(answers), (tok.decode(ids), runs)
    for run, answer in zip(runs, answers):
        assert [labels[i] for i in run] == [ids[i] for i in run]
        assert ids[run[-1]] == tok.eos_token_id, "end-of-turn token must be trained"
        text = tok.decode(ids[run[0] : run[-1] + 1])
        assert squash(text) == squash(answer + tok.eos_token), (text, answer)
    # Everything else (system, user turns, role headers, image placeholder) is ignored.
    n_answer_tokens = sum(len(r) for r in runs)
    assert sum(lab != IGNORE for lab in labels) == n_answer_tokens


# Text without the characters that spell special tokens; newlines, unicode and odd spacing included.
_text = st.text(
    alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()-\n\téü中 ")), min_size=1,
    max_size=40,
).filter(lambda s: s.strip())


@st.composite
def conversations(draw: st.DrawFn) -> dict:
    n_rounds = draw(st.integers(1, 4))
    with_image = draw(st.integers(0, 4)) > 0  # mostly image samples, some text-only (LLaVA-1.5 mix)
    turns = []
    for r in range(n_rounds):
        q = draw(_text)
        if r == 0 and with_image:
            q = draw(st.sampled_from([f"{IMAGE}\n{q}", f"{q}\n{IMAGE}", f"{IMAGE} {q}"]))
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": draw(_text)}]
    if draw(st.booleans()):
        turns.insert(0, {"from": "system", "value": VICUNA_SYSTEM})
    return {"id": "h", "image": "x.jpg", "conversations": turns} if with_image else {"id": "h", "conversations": turns}


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rec=conversations())
def test_masking_property_random(encoders: dict[str, ConversationEncoder], rec: dict) -> None:
    messages = to_messages(rec, IMAGE)
    for enc in encoders.values():
        check_labels(enc, messages)


def test_masking_property_real_coco(encoders: dict[str, ConversationEncoder]) -> None:
    n = 0
    for split in ("val2017", "train2017"):
        for k, (name, caps) in enumerate(coco_captions(split)):
            turns = [{"from": "human", "value": f"{IMAGE}\nWhat do you see?" if k % 2 else f"Describe this.\n{IMAGE}"}]
            turns.append({"from": "gpt", "value": caps[0]})
            for c in caps[1 : 1 + k % 3]:
                turns += [{"from": "human", "value": "And what else?"}, {"from": "gpt", "value": c}]
            messages = to_messages({"id": name, "image": name, "conversations": turns}, IMAGE)
            for enc in encoders.values():
                check_labels(enc, messages)
            n += 1
    assert n == 159


def test_labels_known_example(encoders: dict[str, ConversationEncoder]) -> None:
    rec = {"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                      {"from": "gpt", "value": "A red bus."}]}
    enc = encoders["smollm2-chatml"]
    ids, labels = enc.encode(to_messages(rec, IMAGE))
    kept = [enc.tokenizer.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != IGNORE]
    assert "".join(kept).replace("Ġ", " ") == "A red bus.<|im_end|>"


def test_non_incremental_template_is_an_error() -> None:
    tok = smollm_tokenizer()
    # Renders the number of messages up front: earlier prefixes change when turns are added.
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] + '<|im_end|>' }}{% endfor %}"
    rec = {"id": 1, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(TrainError, match="not incremental"):
        ConversationEncoder(tok).encode(to_messages(rec, IMAGE))


@pytest.mark.parametrize("value,count", [("no placeholder here", 0), ("<image>\n<image>\ntwo", 2)])
def test_sample_needs_exactly_one_image_token(value: str, count: int) -> None:
    rec = {"id": "s1", "image": "a.jpg", "conversations": [{"from": "human", "value": value},
                                                          {"from": "gpt", "value": "a"}]}
    with pytest.raises(TrainError, match=f"sample s1 has {count} '<image>'"):
        to_messages(rec, IMAGE)


def test_placeholder_without_image_field_is_an_error() -> None:
    rec = {"id": "s2", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(TrainError, match="sample s2 has '<image>' but no 'image' field"):
        to_messages(rec, IMAGE)


def _prepare(tmp_path: Path, recs: list[dict], max_length: int, enc: ConversationEncoder,
             image_position: str = "first") -> tuple[list, DataReport]:
    tok = enc.tokenizer
    return prepare(recs, SampleSpec(enc, COCO / "val2017", tok.convert_tokens_to_ids(IMAGE), IMAGE, 16, max_length,
                                    image_position))


def test_missing_image_is_a_clear_error(tmp_path: Path, encoders: dict[str, ConversationEncoder]) -> None:
    rec = {"id": 1, "image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                           {"from": "gpt", "value": "a"}]}
    with pytest.raises(TrainError, match="image file\\(s\\) not found.*nope.jpg"):
        _prepare(tmp_path, [rec], 256, encoders["smollm2-chatml"])


def test_truncation_counts_and_never_cuts_image(tmp_path: Path, encoders: dict[str, ConversationEncoder]) -> None:
    enc = encoders["smollm2-chatml"]
    name = coco_captions("val2017")[0][0]
    long_q = "word " * 60
    recs = [
        {"id": "ok", "image": name, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                      {"from": "gpt", "value": "short answer"}]},
        # answer lies entirely past max_length: labels truncated away -> dropped and counted
        {"id": "late", "image": name, "conversations": [{"from": "human", "value": f"<image>\n{long_q}"},
                                                        {"from": "gpt", "value": "answer"}]},
        # image block would straddle max_length -> dropped and counted, never cut
        {"id": "img", "image": name, "conversations": [{"from": "human", "value": f"{long_q}\n<image>"},
                                                       {"from": "gpt", "value": "answer"}]},
        # long answer: truncated but kept, labels survive
        {"id": "cut", "image": name, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                       {"from": "gpt", "value": long_q}]},
    ]
    samples, report = _prepare(tmp_path, recs, 64, enc, image_position="keep")  # "img" keeps <image> late
    assert len(samples) == 2
    assert report.total == 4 and report.kept == 2
    assert report.labels_truncated_away == 1 and report.image_past_max_length == 1 and report.truncated == 1
    assert set(report.dropped_ids) == {"late", "img"}
    image_id = enc.tokenizer.convert_tokens_to_ids(IMAGE)
    for s in samples:
        assert s.length <= 64 and s.ids.count(image_id) == 1
        assert any(lab != IGNORE for lab in s.labels)


def test_read_json_array_and_jsonl_ignore_extra_keys(tmp_path: Path) -> None:
    recs = [{"id": i, "image": "a.jpg", "split": "x", "meta": {"k": 1},
             "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert len(read_records([tmp_path / "a.json", tmp_path / "b.jsonl"])) == 6
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(TrainError, match="not valid JSON"):
        read_records([tmp_path / "bad.jsonl"])
    with pytest.raises(TrainError, match="does not exist"):
        read_records([tmp_path / "missing.jsonl"])
