"""The default quality gate inside a generation run: rejected samples land in the rejects file with codes."""
from __future__ import annotations

import asyncio
import json

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.coco import CocoIndex
from datagen.engine.config import EngineConfig
from datagen.executors.local import run_local
from datagen.sample import OutputLayout
from datagen.task import LlavaTask
from datagen.prompts import load_prompt_set

GOOD = ("Question: Who is in the room?\nAnswer: A woman is standing near the table.\n"
        "Question: What furniture is there?\nAnswer: There are chairs around a wooden table.")


class ScriptedBackend:
    """Returns a fixed completion per image id, so each image exercises one outcome of the gate."""

    name = "scripted"
    model = "scripted-1"
    preferred_concurrency = 1

    def __init__(self, texts: dict[int, tuple[str, str]]) -> None:
        self.texts = texts

    async def complete(self, request: ChatRequest) -> Completion:
        text, finish = self.texts[int(request.key.split(":")[0])]
        return Completion(text=text, finish_reason=finish, prompt_tokens=10, completion_tokens=20, model=self.model)

    async def aclose(self) -> None:
        return None


def test_generation_rejects_carry_quality_reasons(coco_root, prompts_dir, tmp_path):
    index = CocoIndex(coco_root, "val2017", with_instances=False)
    ids = index.image_ids()[:5]  # 139, 802, 11813, 18575, 22192
    texts = {
        ids[0]: (GOOD, "stop"),
        ids[1]: ("Question: What is shown?\nAnswer: I'm sorry, but I cannot see the image.\n"
                 "Question: Anything else?\nAnswer: No.", "stop"),
        ids[2]: ("Question: Where is the laptop?\nAnswer: Its box is at [0.1, 0.2, 0.5, 0.6] in the image.\n"
                 "Question: What else is there?\nAnswer: A camera on a tripod.", "stop"),
        ids[3]: (GOOD, "stop"),  # the same text again: a near-duplicate of the first
        ids[4]: ("Question: What animal is on the bed?\nAnswer: A dog sits on the bed next to a sleeping cat.\n"
                 "Question: Is the bed tidy?\nAnswer: No, it is covered with blankets.", "stop"),
    }
    out = tmp_path / "conversation.jsonl"
    task = LlavaTask("conversation", load_prompt_set(prompts_dir, "conversation"), SamplingParams())
    stats = asyncio.run(run_local(task, OutputLayout(out), ScriptedBackend(texts), index.records(ids), EngineConfig(), 1))
    accepted = [json.loads(line) for line in out.read_text().splitlines()]
    rejected = {r["id"]: r for r in map(json.loads, OutputLayout(out).rejects.read_text().splitlines())}
    assert [r["id"] for r in accepted] == [f"{ids[0]:012d}"]
    assert rejected[f"{ids[1]:012d}"]["reject_reasons"] == ["refusal"]
    assert rejected[f"{ids[2]:012d}"]["reject_reasons"] == ["source_leak"]
    # 18575 shows burgers, not a woman and chairs: the copied text is also a hallucination there.
    assert rejected[f"{ids[3]:012d}"]["reject_reasons"] == ["hallucinated_object", "near_duplicate"]
    # Conversation runs see captions only, so the cat (in no caption of 22192) is the hallucination.
    assert rejected[f"{ids[4]:012d}"]["reject_reasons"] == ["hallucinated_object"]
    assert stats.accepted == 1 and stats.rejected == 4
    assert all("raw" in r and "context" in r for r in rejected.values())


def test_a_resumed_run_remembers_what_it_accepted_before(coco_root, prompts_dir, tmp_path):
    index = CocoIndex(coco_root, "val2017", with_instances=False)
    first, second = index.image_ids()[:2]
    out = tmp_path / "conversation.jsonl"
    prompts = load_prompt_set(prompts_dir, "conversation")
    backend = ScriptedBackend({first: (GOOD, "stop"), second: (GOOD, "stop")})
    for ids in ([first], [first, second]):  # the second run resumes: `first` is skipped, `second` is new
        if out.exists():
            with open(out, "a") as fh:
                fh.write('{"id": "half a line from a killed run')
        task = LlavaTask("conversation", prompts, SamplingParams(), coco_available=False)
        asyncio.run(run_local(task, OutputLayout(out), backend, index.records(ids), EngineConfig(), 1))
    rejected = [json.loads(line) for line in OutputLayout(out).rejects.read_text().splitlines()]
    assert [r["reject_reasons"] for r in rejected] == [["near_duplicate"]]
    assert rejected[0]["id"] == f"{second:012d}"
