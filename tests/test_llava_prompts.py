"""LLaVA's published prompt layout and answer format, read as they are (files and answers written here)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.errors import VisinstructError
from datagen.parse import build_sample, parse_pairs, ParseRules
from datagen.prompts import default_prompts_dir, load_prompt_set
from datagen.engine.config import EngineConfig
from datagen.executors.local import run_local
from datagen.quality import QualityConfig
from datagen.sample import OutputLayout
from datagen.task import LlavaTask
from engine_support import ids_of, load_index

# Responses in LLaVA's few-shot form: each label on its own line, `===` between blocks.
LLAVA_CONVERSATION = """Question:
What is the cat sitting on?
===
Answer:
The cat is sitting on a wooden table next to a laptop.
===
Question:
What colour is the cat?
===
Answer:
The cat has grey fur with white paws.

Its tail hangs over the edge of the table.
===
Question:
What could the cat be doing there?
===
Answer:
There are a few likely reasons:

1. The laptop is warm, and cats like warm places.
2. The table gives it a good view of the room.
3. It may want attention from whoever uses the laptop.
"""
LLAVA_REASONING = """Question:
Why might the bench be empty?
===
Answer:
The bench stands in a park on a cold, grey day.

People tend to stay indoors in such weather, so nobody is sitting there right now."""


def test_llava_conversation_answers_parse_without_separators():
    pairs = parse_pairs(LLAVA_CONVERSATION, "conversation", truncated=False, rules=ParseRules())
    assert [q for q, _ in pairs] == ["What is the cat sitting on?", "What colour is the cat?",
                                     "What could the cat be doing there?"]
    assert pairs[1][1] == "The cat has grey fur with white paws.\n\nIts tail hangs over the edge of the table."
    assert pairs[2][1].endswith("3. It may want attention from whoever uses the laptop.")
    assert "1. The laptop is warm" in pairs[2][1]
    assert not any("===" in q or "===" in a for q, a in pairs)


def test_llava_reasoning_answer_keeps_its_paragraphs():
    sample = build_sample(split="reasoning", text=LLAVA_REASONING, sample_id="1", image="1.jpg", instruction=None, meta={})
    answer = sample.conversations[1].value
    assert answer.startswith("The bench stands") and answer.endswith("right now.") and "\n\n" in answer


def test_separator_at_the_end_or_in_detail_text_is_dropped():
    sample = build_sample(split="detail", text="A calm street at dusk.\n===\n", sample_id="1", image="1.jpg",
                          instruction="Describe the image.", meta={})
    assert sample.conversations[1].value == "A calm street at dusk."


_SENTENCE = st.text(alphabet="abcdefghij klmnop,'", min_size=1, max_size=40).map(lambda s: s.strip() or "x")
_PARAGRAPHS = st.lists(_SENTENCE.map(lambda s: s + "."), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_SENTENCE.map(lambda s: s + "?"), _PARAGRAPHS), min_size=2, max_size=5))
def test_both_formats_give_the_same_pairs(turns):
    """Ours (`Question: ...` one line) and LLaVA's (label lines, `===` blocks) parse to the same questions and answers."""
    ours = "\n".join(f"Question: {q}\nAnswer: {' '.join(a)}" for q, a in turns)
    llava = "\n===\n".join(f"Question:\n{q}\n===\nAnswer:\n{' '.join(a)}" for q, a in turns)
    rules = ParseRules()
    expected = [(q, " ".join(a)) for q, a in turns]
    assert parse_pairs(ours, "conversation", False, rules) == expected
    assert parse_pairs(llava, "conversation", False, rules) == expected


def write_llava_layout(root: Path) -> Path:
    """A folder in LLaVA's published layout (playground/data/prompts/<task>/), with text written for this test."""
    prompts = root / "playground" / "data" / "prompts"
    for task, response in (("conversation", LLAVA_CONVERSATION), ("complex_reasoning", LLAVA_REASONING),
                           ("detail_description", "A cat rests on a table beside a laptop in a quiet room.")):
        folder = prompts / task
        folder.mkdir(parents=True)
        (folder / "system_message.txt").write_text(f"You write {task} data about one image.\n")
        (folder / "000_caps.txt").write_text("A grey cat on a table.\nA cat next to a laptop.\n")
        (folder / "000_conv.txt").write_text(response)
        (folder / "001_caps.txt").write_text("A park bench on a cloudy day.\n")
        (folder / "001_conv.txt").write_text(response)
    return prompts


@pytest.mark.parametrize("point_at", ["checkout", "prompts"])
def test_prompts_dir_reads_llava_layout(tmp_path, point_at):
    prompts = write_llava_layout(tmp_path)
    root = tmp_path if point_at == "checkout" else prompts
    conv = load_prompt_set(root, "conversation")
    assert conv.system == "You write conversation data about one image."
    assert [c for c, _ in conv.examples] == ["A grey cat on a table.\nA cat next to a laptop.",
                                             "A park bench on a cloudy day."]
    assert conv.examples[0][1] == LLAVA_CONVERSATION.strip()
    assert load_prompt_set(root, "reasoning").system.startswith("You write complex_reasoning")
    detail = load_prompt_set(root, "detail")
    assert detail.system.startswith("You write detail_description")
    # LLaVA has no instruction list file for detail: the shipped one serves.
    assert detail.instructions == load_prompt_set(None, "detail").instructions
    # Nor negative/grounded prompts: the shipped ones serve.
    assert load_prompt_set(root, "negative").system == load_prompt_set(None, "negative").system
    assert conv.hash != load_prompt_set(None, "conversation").hash


def test_llava_layout_hash_follows_the_files(tmp_path):
    prompts = write_llava_layout(tmp_path)
    before = load_prompt_set(tmp_path, "conversation").hash
    (prompts / "conversation" / "001_conv.txt").write_text(LLAVA_CONVERSATION + "\n")
    assert load_prompt_set(tmp_path, "conversation").hash != before
    assert load_prompt_set(tmp_path, "reasoning").hash == load_prompt_set(tmp_path, "reasoning").hash


def test_llava_layout_with_a_context_but_no_response_is_an_error(tmp_path):
    prompts = write_llava_layout(tmp_path)
    (prompts / "conversation" / "001_conv.txt").unlink()
    with pytest.raises(VisinstructError, match="001_conv.txt"):
        load_prompt_set(tmp_path, "conversation")


def test_shipped_prompts_still_load_for_every_split():
    for split in ("conversation", "detail", "reasoning", "negative", "grounded"):
        assert load_prompt_set(default_prompts_dir(), split).examples


class FewShotEcho:
    """An endpoint that answers every request with the prompt's own first few-shot response (as GPT-4 wrote them)."""

    name, model, preferred_concurrency = "echo", "echo", 4
    observe_headers = None

    async def complete(self, request: ChatRequest) -> Completion:
        return Completion(request.messages[2]["content"], "stop", 100, 100, "echo")

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("split", ["conversation", "reasoning"])
def test_generation_with_llava_prompts_accepts_llava_answers(tmp_path, coco_root, split):
    """The issue's reproduction: LLaVA-layout prompts, an endpoint answering in LLaVA's format; nothing is
    rejected truncated/too_long for `===` kept inside the turns."""
    write_llava_layout(tmp_path / "llava")
    out = tmp_path / f"{split}.jsonl"
    index = load_index(coco_root, split)
    ids = index.image_ids()[:4]
    # Without COCO records the object check is off: the few-shot answer is about another image; and every
    # answer is the same text, so near-duplicates are off too.
    config = QualityConfig(disabled_checks=["near_duplicate"])
    task = LlavaTask(split, load_prompt_set(tmp_path / "llava", split), SamplingParams(), config, coco_available=False)
    layout = OutputLayout(out)
    stats = asyncio.run(run_local(task, layout, FewShotEcho(), index.records(ids), EngineConfig(), 4))
    assert stats.accepted == 4, stats.reject_reasons
    assert ids_of(layout.rejects) == []
