"""Quality thresholds: one typed model with defaults, loadable from YAML or JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from datagen.errors import VisinstructError
from datagen.inputs import load_yaml


class LengthBounds(BaseModel):
    """Word-count limits for every answer (and question) of one split."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_answer_words: int = Field(1, ge=0)
    max_answer_words: int = Field(1000, ge=1)
    max_question_words: int = Field(200, ge=1)


def _default_lengths() -> dict[str, LengthBounds]:
    # Sized from LLaVA-Instruct-158K's shape: short chat answers, ~100-200 word descriptions and
    # explanations, one-line captions. "default" covers samples whose split is unknown.
    return {
        "conversation": LengthBounds(min_answer_words=1, max_answer_words=300, max_question_words=80),
        "detail": LengthBounds(min_answer_words=25, max_answer_words=400, max_question_words=80),
        "reasoning": LengthBounds(min_answer_words=12, max_answer_words=400, max_question_words=120),
        "captions": LengthBounds(min_answer_words=3, max_answer_words=60, max_question_words=40),
        "default": LengthBounds(),
    }


class QualityConfig(BaseModel):
    """Every threshold the checks use; a YAML/JSON file overrides any subset of these."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    disabled_checks: list[str] = Field(default_factory=list, description="Reason codes not to check.")
    image_token_position: Literal["start", "start_or_end"] = Field(
        "start", description="Where <image> may sit in the first human turn (LLaVA's released files use both)."
    )
    lengths: dict[str, LengthBounds] = Field(default_factory=_default_lengths)
    truncate_on_finish_length: bool = Field(True, description="A completion that hit the token limit is truncated.")
    min_words_needing_final_punctuation: int = Field(
        4, ge=1, description="Answers at least this long must end a sentence (short ones like 'Yes' need not)."
    )
    unpunctuated_splits: list[str] = Field(
        default_factory=lambda: ["captions"], description="Splits whose answers may end without punctuation."
    )
    repeated_question_similarity: float = Field(0.8, ge=0, le=1, description="Word-set Jaccard counted as repeat.")
    paraphrase_max_inserted_words: int = Field(
        6, ge=1, description="paraphrased_question: a question that is an earlier one with at most this many words "
                             "added in one place restates it.")
    paraphrase_min_shared_words: int = Field(
        2, ge=1, description="paraphrased_question: two questions of the same kind with the same topic words (at least "
                             "this many) restate each other.")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="Estimated shingle Jaccard of answers.")
    near_duplicate_skip_splits: list[str] = Field(
        default_factory=lambda: ["captions"], description="Splits where repeated text is expected (COCO captions)."
    )
    shingle_size: int = Field(2, ge=1, description="Words per shingle (2 keeps short conversations comparable).")
    minhash_permutations: int = Field(128, ge=8)
    count_hedged_mentions: bool = Field(
        False, description="Count objects named in a hedged sentence (might, could, if, likely) for CHAIR."
    )
    max_hallucinated_objects: int = Field(0, ge=0, description="Reject above this many hallucinated categories.")
    lenient_object_mentions: bool = Field(
        True, description="The object check ignores objects spoken of in general, in comparisons, or denied after the "
                          "word ('protects people from the sun', 'like a dog', 'the dog is not there'); CHAIR counts them.")

    @model_validator(mode="before")
    @classmethod
    def _merge_lengths(cls, data: Any) -> Any:
        """A file that sets one split's lengths keeps the defaults of the others."""
        if isinstance(data, dict) and isinstance(data.get("lengths"), dict):
            merged: dict[str, Any] = {k: v.model_dump() for k, v in _default_lengths().items()}
            for split, bounds in data["lengths"].items():
                base = merged.get(split, {})
                merged[split] = {**base, **bounds} if isinstance(bounds, dict) else bounds
            data = {**data, "lengths": merged}
        return data

    def bounds(self, split: str | None) -> LengthBounds:
        """Length limits of a split, or the default ones."""
        return self.lengths.get(split or "default") or self.lengths.get("default") or LengthBounds()

    def with_overrides(self, **changes: Any) -> "QualityConfig":
        """A copy with the given fields replaced (None means keep), validated."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        return QualityConfig.model_validate(data)


def load_config(path: Path | None) -> QualityConfig:
    """Defaults, overridden by a YAML or JSON file when given."""
    if path is None:
        return QualityConfig()
    path = Path(path)
    data = load_yaml(path, "quality config", "fix the syntax")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VisinstructError(f"quality config {path} must be a mapping of field: value", "see QualityConfig fields in the README")
    try:
        config = QualityConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise VisinstructError(f"quality config {path}: {where}: {err['msg']}", "see QualityConfig fields in the README") from None
    return config
