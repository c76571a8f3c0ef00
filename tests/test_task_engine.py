"""Task, engine, judge and sink as separate objects: order-independent near-duplicates, same files either way."""
from __future__ import annotations

import asyncio
import json
import pickle
import random

import numpy as np

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.coco import CocoIndex
from datagen.engine.config import EngineConfig
from datagen.engine.errors import TransientError
from datagen.engine.judging import InlineJudge, ProcessJudge
from datagen.engine.live import backoff_s
from datagen.engine.work import RunStats
from datagen.executors.local import run_local
from datagen.jsonl import JsonlWriter
from datagen.prompts import load_prompt_set
from datagen.sample import OutputLayout
from datagen.sink import OutputSink
from datagen.task import Accepted, LlavaTask, Rejected

# Answers about a woman and a table: near-copies of each other except for one word.
ORIGINAL = ("Question: Who is in the room?\nAnswer: A woman is standing near the wooden table in the room.\n"
            "Question: What furniture is there?\nAnswer: There are chairs around a wooden table.")
NEAR_COPY = ORIGINAL.replace("chairs around a wooden table.", "chairs around a wooden table today.")
OTHER = ("Question: What is on the plate?\nAnswer: A sandwich with lettuce is on the plate.\n"
         "Question: Is there a drink?\nAnswer: Yes, a glass of water stands next to it.")


class ScriptedBackend:
    """A fixed completion per image id."""

    name = "scripted"
    model = "scripted-1"
    preferred_concurrency = 4
    observe_headers = None

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts

    async def complete(self, request: ChatRequest) -> Completion:
        text = self.texts[int(request.key.split(":")[0])]
        return Completion(text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=20, model=self.model)

    async def aclose(self) -> None:
        return None


@pytest.fixture(scope="module")
def task(prompts_dir) -> LlavaTask:
    return LlavaTask("conversation", load_prompt_set(prompts_dir, "conversation"), SamplingParams(),
                     provenance={"backend": "scripted"}, coco_available=False)


@pytest.fixture(scope="module")
def judged(task, coco_root):
    """Verdicts for 8 images: copies of one text, near-copies, and an unrelated one."""
    index = CocoIndex(coco_root, "val2017", with_instances=False)
    ids = index.image_ids()[:8]
    texts = [ORIGINAL, NEAR_COPY, OTHER, ORIGINAL, NEAR_COPY, OTHER, ORIGINAL, "no questions here"]
    prepared = [task.prepare(index.record(i)) for i in ids]
    completions = [Completion(t, "stop", 10, 20, "m") for t in texts]
    return [task.judge(p, c) for p, c in zip(prepared, completions)]


def sink_output(tmp_path, task, verdicts, order):
    """Feed verdicts (seq = position) to a fresh sink in the given arrival order; return the written ids."""
    layout = OutputLayout(tmp_path / f"run-{'-'.join(map(str, order))}.jsonl")
    sink = OutputSink(layout, task.split, RunStats(), task.near_duplicate_gate(None))
    sink.open()
    for seq in order:
        sink.verdict(seq, verdicts[seq])
        if random.random() < 0.3:
            sink.flush()
    sink.close()
    read = lambda p: [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []  # noqa: E731
    return ([r["id"] for r in read(layout.samples)],
            {r["id"]: r["reject_reasons"] for r in read(layout.rejects)})


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(8)))
def test_near_duplicates_keep_the_first_image_whatever_the_arrival_order(tmp_path_factory, task, judged, order):
    accepted, rejected = sink_output(tmp_path_factory.mktemp("sink"), task, judged, list(order))
    first = sink_output(tmp_path_factory.mktemp("sink"), task, judged, list(range(8)))
    assert (accepted, rejected) == first
    ids = [v.item_id for v in judged]
    # The lowest id of each family of near-copies is kept; the others are rejected as near-duplicates.
    assert accepted == [ids[0], ids[2]]
    assert all(rejected[ids[k]] == ["near_duplicate"] for k in (1, 3, 4, 5, 6))
    assert rejected[ids[7]] == ["no_qa_format"]


def test_verdicts_say_what_they_are(judged):
    assert isinstance(judged[0], Accepted) and judged[0].signature is not None
    assert isinstance(judged[7], Rejected) and judged[7].entry["reject_reasons"] == ["no_qa_format"]
    assert judged[7].entry["raw"] == "no questions here" and "context" in judged[7].entry


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(record=st.dictionaries(st.text(), _JSON_VALUES, max_size=6),
       signature=st.none() | st.lists(st.integers(0, 2**31 - 2), min_size=8, max_size=8),
       bands=st.none() | st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
       protocol=st.sampled_from([2, pickle.HIGHEST_PROTOCOL]))
def test_an_accepted_verdict_crosses_processes_as_the_line_the_sink_writes(tmp_path_factory, record, signature, bands,
                                                                           protocol):
    sig = None if signature is None else np.array(signature, dtype=np.uint32)
    verdict = Accepted("000000000001", record, sig, {"raw": "text"}, bands)
    back = pickle.loads(pickle.dumps(verdict, protocol))
    assert back.line == json.dumps(record, ensure_ascii=False)  # the bytes written before lines were sent
    assert back.record == json.loads(json.dumps(record))  # what reading the line back gives (tuples as lists)
    assert back.item_id == verdict.item_id and back.bands == bands and back.evidence == {"raw": "text"}
    assert (back.signature is None) == (sig is None) and (sig is None or np.array_equal(back.signature, sig))
    assert back.rejected(["near_duplicate"], "x").entry["reject_reasons"] == ["near_duplicate"]
    path = tmp_path_factory.mktemp("lines") / "out.jsonl"
    writer = JsonlWriter(path)
    writer.write_lines([back.line])
    writer.write_many([record])
    writer.close()
    first, second, end = path.read_bytes().split(b"\n")  # JSONL lines end at "\n" only (U+2028 stays in a line)
    assert first == second and end == b""


def test_checks_in_a_worker_process_write_the_same_files(tmp_path, task, coco_root):
    index = CocoIndex(coco_root, "val2017", with_instances=False)
    ids = index.image_ids()[:12]
    texts = {i: [ORIGINAL, NEAR_COPY, OTHER, "Question: Why?\nAnswer:"][k % 4] for k, i in enumerate(ids)}
    outputs = []
    for name, judge in (("inline", InlineJudge(task)), ("process", ProcessJudge(task)),
                        ("three-processes", ProcessJudge(task, workers=3))):
        layout = OutputLayout(tmp_path / f"{name}.jsonl")
        stats = asyncio.run(run_local(task, layout, ScriptedBackend(texts), index.records(ids), EngineConfig(), 4,
                                      judge=judge))
        assert stats.accepted + stats.rejected == len(ids)
        outputs.append((layout.samples.read_text(), layout.rejects.read_text()))
    assert outputs[0] == outputs[1] == outputs[2]


@given(base=st.floats(0.001, 5), cap=st.floats(0.01, 120), attempt=st.integers(1, 30),
       hinted=st.one_of(st.none(), st.floats(0, 300)))
def test_backoff_is_full_jitter_under_the_cap_unless_the_server_says(base, cap, attempt, hinted):
    config = EngineConfig(backoff_base_s=base, backoff_max_s=cap)
    wait = backoff_s(config, TransientError("503", retry_after=hinted), attempt)
    if hinted is not None:
        assert wait == hinted
    else:
        assert 0 <= wait <= min(cap, base * 2 ** (attempt - 1))


def test_output_layout_names_every_file_beside_the_output(tmp_path):
    layout = OutputLayout(tmp_path / "detail.jsonl")
    assert layout.rejects.name == "detail.rejects.jsonl" and layout.runs.name == "detail.runs.jsonl"
    assert layout.failures.name == "detail.failures.jsonl" and layout.batch_state.name == "detail.batch.json"
    assert layout.batch_dir.name == "detail.batch" and layout.batch_failures.parent == layout.batch_dir
    assert OutputLayout.default("detail", "2/4").samples.name == "detail.shard-2-of-4.jsonl"
