"""LLaVA's training sample format, validated."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGE_TOKEN = "<image>"


class Turn(BaseModel):
    """One message of a conversation, in LLaVA's {"from", "value"} form."""

    model_config = ConfigDict(populate_by_name=True)

    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Sample(BaseModel):
    """A LLaVA-format sample plus our `split` and `meta` (LLaVA's trainer ignores extra keys)."""

    model_config = ConfigDict(extra="allow")

    id: str
    image: str
    conversations: list[Turn]
    split: str | None = None
    meta: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_turns(self) -> "Sample":
        turns = self.conversations
        if len(turns) < 2 or len(turns) % 2:
            raise ValueError("a sample needs an even number (>= 2) of turns")
        for i, turn in enumerate(turns):
            expected = "human" if i % 2 == 0 else "gpt"
            if turn.speaker != expected:
                raise ValueError(f"turn {i} is from {turn.speaker!r}, expected {expected!r}")
            if not turn.value.strip():
                raise ValueError(f"turn {i} is empty")
            count = turn.value.count(IMAGE_TOKEN)
            if i == 0 and (count != 1 or not turn.value.startswith(IMAGE_TOKEN)):
                raise ValueError("<image> must appear once, at the start of the first human turn")
            if i > 0 and count:
                raise ValueError(f"<image> appears in turn {i}")
        return self

    def to_record(self) -> dict[str, Any]:
        """The JSON object written to disk (LLaVA's keys first)."""
        return self.model_dump(by_alias=True, exclude_none=True)
