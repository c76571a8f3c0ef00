"""The LLaVA generation task: image record -> request; completion -> accepted sample | rejection.

It knows LLaVA (context, prompts, instruction choice, parsing, the quality gate) and nothing of
threads, HTTP, files or money, so every executor (the local engine, the Batch API, Ray workers) runs
the same task. The one stateful part of the gate, near-duplicates, is `NearDuplicateGate`: the sink
applies it in the run's order (see `datagen.sink`), so the decision does not depend on which request
happens to finish first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.coco import ImageRecord
from datagen.context import ContextBuilder, context_meta
from datagen.jsonl import json_line, repair_tail
from datagen.parse import ParseError, build_record
from datagen.prompts import PromptSet, pick_instruction
from datagen.quality.checks import NEAR_DUPLICATE, QualityChecker, SampleView
from datagen.quality.config import QualityConfig
from datagen.quality.minhash import NearDuplicateIndex
from datagen.sample import read_samples, sample_id
from datagen.splits import SPLITS_WITH_BOXES


@dataclass(frozen=True)
class Subject:
    """What judging a completion needs to know about its image: small, so it is cheap to send to a worker."""

    item_id: str  # the sample id: the unit of resume, sharding and the failures file
    record: ImageRecord
    context: str


@dataclass(frozen=True)
class TaskRequest(Subject):
    """One image's chat request, with its subject (what judging the completion needs)."""

    request: ChatRequest

    @property
    def subject(self) -> Subject:
        return Subject(self.item_id, self.record, self.context)


def reject_entry(base: dict[str, Any], reasons: list[str], detail: str, evidence: dict[str, Any]) -> dict[str, Any]:
    """A rejects-file line: the sample (or its id, image and split), why, and what the model saw and said."""
    return {**base, "reject_reasons": reasons, "detail": detail, **evidence}


@dataclass(frozen=True)
class Rejected:
    """A completion the task refused, with its reason codes.

    `base` is the sample (or, when it did not parse, its id, image and split); `evidence` the context,
    raw text and meta the rejects file keeps; `signature` the answers' MinHash when near-duplicates are
    checked (a rejected sample is still reported as a near-copy, but never kept as an original), and `bands`
    its LSH band keys (computed where the sample was judged, so the gate does not).
    """

    item_id: str
    reasons: list[str]
    base: dict[str, Any]
    detail: str = ""
    evidence: dict[str, Any] = field(default_factory=dict, repr=False)
    signature: np.ndarray | None = field(default=None, repr=False)
    bands: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def entry(self) -> dict[str, Any]:
        """The rejects-file line."""
        return reject_entry(self.base, self.reasons, self.detail, self.evidence)

    def with_reason(self, code: str) -> "Rejected":
        return Rejected(self.item_id, [*self.reasons, code], self.base, self.detail, self.evidence, self.signature,
                        self.bands)

    def __reduce__(self):
        """Pickled as its fields, the signature as raw bytes (verdicts cross processes once per sample)."""
        return (_rejected, (self.item_id, self.reasons, self.base, self.detail, self.evidence,
                            _signature_bytes(self.signature), self.bands))


class Accepted:
    """A completion that passed every check that looks at one sample alone.

    `record` is the sample as written and `line` its JSON line; `signature` its answers' MinHash for the
    near-duplicate gate (None: the split is exempt or the gate is off) and `bands` its band keys; `evidence`
    goes into the rejects file if that gate refuses it.

    It crosses processes (judge workers, Ray workers) as its line, encoded where it was judged: the process
    that writes it then neither unpickles the sample's dicts nor encodes them again, and reads the record
    back only if the gate refuses it.
    """

    __slots__ = ("item_id", "signature", "evidence", "bands", "_record", "_line")

    def __init__(self, item_id: str, record: dict[str, Any] | None, signature: np.ndarray | None = None,
                 evidence: dict[str, Any] | None = None, bands: tuple[int, ...] | None = None,
                 line: str | None = None) -> None:
        if record is None and line is None:
            raise ValueError("an accepted sample needs its record or its line")
        self.item_id = item_id
        self.signature = signature
        self.evidence = {} if evidence is None else evidence
        self.bands = bands
        self._record = record
        self._line = line

    @property
    def record(self) -> dict[str, Any]:
        if self._record is None:
            self._record = json.loads(self._line)
        return self._record

    @property
    def line(self) -> str:
        """The sample's line in the output file (datagen.jsonl.json_line, without the newline)."""
        if self._line is None:
            self._line = json_line(self._record)
        return self._line

    def rejected(self, reasons: list[str], detail: str) -> Rejected:
        return Rejected(self.item_id, reasons, self.record, detail, self.evidence)

    def __repr__(self) -> str:
        return f"Accepted(item_id={self.item_id!r})"

    def __reduce__(self):
        """Pickled as its line, the signature as raw bytes (see the class docs and `Rejected.__reduce__`)."""
        return (_accepted, (self.item_id, self.line, _signature_bytes(self.signature), self.evidence, self.bands))


def _signature_bytes(signature: np.ndarray | None) -> bytes | None:
    return None if signature is None else np.ascontiguousarray(signature, dtype=np.uint32).tobytes()


def _signature_array(raw: bytes | None) -> np.ndarray | None:
    return None if raw is None else np.frombuffer(raw, dtype=np.uint32)  # read-only: the gate only reads it


def _rejected(item_id, reasons, base, detail, evidence, signature, bands) -> Rejected:
    return Rejected(item_id, reasons, base, detail, evidence, _signature_array(signature), bands)


def _accepted(item_id, line, signature, evidence, bands) -> Accepted:
    return Accepted(item_id, None, _signature_array(signature), evidence, bands, line=line)


Verdict = Accepted | Rejected


def candidate_rank(verdict: Verdict, completion: Completion) -> tuple[int, int, int]:
    """Best-of-N order: accepted before rejected, then fewer reasons, then the longer answer text."""
    if isinstance(verdict, Accepted):
        return (1, 0, len(completion.text))
    return (0, -len(verdict.reasons), len(completion.text))


class NearDuplicateGate:
    """Among near-copies, keeps the one that comes first in the run's order (ascending image id).

    `decide` must be called in that order; the sink does so by holding accepted samples until every
    earlier item of the run is decided. Samples accepted by earlier runs are remembered as they are
    (they cannot be taken back), so a rerun of a failed item compares it with every kept sample.
    """

    def __init__(self, index: NearDuplicateIndex) -> None:
        self.index = index

    def remember(self, item_id: str, text: str) -> None:
        """An already accepted sample (an earlier run's) that later samples must not copy."""
        if text.strip():
            self.index.insert(item_id, self.index.signature(text))

    def decide(self, verdict: Verdict) -> Verdict:
        """The verdict after comparing with the samples kept so far: a near-copy is rejected (or gets the
        reason added); an accepted original joins the index."""
        if verdict.signature is None:
            return verdict
        match = self.index.match(verdict.signature, verdict.bands)
        if isinstance(verdict, Rejected):
            return verdict.with_reason(NEAR_DUPLICATE) if match is not None else verdict
        if match is not None:
            return verdict.rejected([NEAR_DUPLICATE], f"answers ~{match[1]:.2f} similar to sample {match[0]}")
        self.index.insert(verdict.item_id, verdict.signature, verdict.bands)
        return verdict


class LlavaTask:
    """One split's LLaVA generation: prompts, sampling and the quality gate, with no I/O of its own.

    `provenance` goes into every sample's meta (backend name, ...); `coco_available` False skips the
    object checks (no boxes to compare with). `context` renders what the writer sees (the negative split's
    absent objects need co-occurrence counts: see `context_builder`); None: the split's plain context.
    """

    def __init__(self, split: str, prompts: PromptSet, params: SamplingParams, quality: QualityConfig | None = None,
                 provenance: dict[str, Any] | None = None, coco_available: bool = True, gate: bool = True,
                 context: ContextBuilder | None = None) -> None:
        self.split = split
        self.context = context or ContextBuilder(split)
        self.prompts = prompts
        self.params = params
        self.with_boxes = split in SPLITS_WITH_BOXES
        self.coco_available = coco_available
        self.gate = gate
        quality = quality or QualityConfig()
        self.quality = quality
        self.near_duplicates_on = (gate and NEAR_DUPLICATE not in quality.disabled_checks
                                   and split not in quality.near_duplicate_skip_splits)
        # The per-sample checks; near-duplicates are decided in run order by NearDuplicateGate instead.
        self.checker = QualityChecker(quality.with_overrides(
            disabled_checks=sorted(set(quality.disabled_checks) | {NEAR_DUPLICATE}))) if gate else None
        self.signer = NearDuplicateIndex(quality.near_duplicate_threshold, quality.shingle_size,
                                         quality.minhash_permutations)
        self.meta_base = {**(provenance or {}), "prompt_hash": prompts.hash, "seed": params.seed}
        self._args = (split, prompts, params, quality, provenance, coco_available, gate, context)

    def __reduce__(self):
        """Pickled as its arguments: a worker process rebuilds the checker instead of receiving its caches."""
        return (type(self), self._args)

    @staticmethod
    def needs_boxes(split: str) -> bool:
        """Whether the split's context lists the objects' boxes (so the COCO instances file is needed)."""
        return split in SPLITS_WITH_BOXES

    def item_id(self, record: ImageRecord) -> str:
        """The sample id of an image: what resume, sharding and the failures file count by."""
        return sample_id(record.id)

    def prepare(self, record: ImageRecord) -> TaskRequest:
        """The chat request for one image (its key names the item: image id + split)."""
        context, _ = self.context.render(record)
        request = ChatRequest(key=f"{record.id}:{self.split}", messages=self.prompts.messages(context), params=self.params)
        return TaskRequest(sample_id(record.id), record, context, request)

    def instruction(self, record: ImageRecord) -> str | None:
        """Detail samples get a question drawn per image from the instruction list (stable for a seed)."""
        if self.split != "detail":
            return None
        return pick_instruction(self.prompts.instructions, record.id, self.params.seed)

    def judge(self, prepared: Subject, completion: Completion) -> Verdict:
        """Parse and check a completion; near-duplicates are left to the gate (see the class docs).

        With several choices (best-of-N), the verdict is that of the best: accepted ones first, the longest answers
        among them; if none passed, the one with the fewest reasons. Its meta records N, which was kept, and every
        candidate's reject reasons.
        """
        if not completion.alternatives:
            return self.judge_one(prepared, completion)
        choices = completion.choices
        verdicts = [self.judge_one(prepared, choice) for choice in choices]
        best = max(range(len(choices)), key=lambda k: candidate_rank(verdicts[k], choices[k]))
        summary = {"n": len(choices), "kept": best,
                   "reasons": [v.reasons if isinstance(v, Rejected) else [] for v in verdicts]}
        # Judged again with the summary in its meta (checks are cheap next to a completion; meta is fixed once built).
        return self.judge_one(prepared, replace(choices[best], prompt_tokens=completion.prompt_tokens),
                              {"candidates": summary})

    def judge_one(self, prepared: Subject, completion: Completion, extra_meta: dict[str, Any] | None = None) -> Verdict:
        """Parse and check one completion."""
        record = prepared.record
        meta = {
            **self.meta_base,
            "model": completion.model,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
            "finish_reason": completion.finish_reason,
            **context_meta(self.split, prepared.context),  # a negative sample keeps its absent objects
            **(extra_meta or {}),
        }
        evidence = {"context": prepared.context, "raw": completion.text, "meta": meta}
        try:
            written = build_record(split=self.split, text=completion.text, sample_id=prepared.item_id,
                                   image=record.file_name, instruction=self.instruction(record), meta=meta,
                                   truncated=completion.truncated)
        except ParseError as exc:
            base = {"id": prepared.item_id, "image": record.file_name, "split": self.split}
            return Rejected(prepared.item_id, [exc.code], base, exc.detail, evidence)
        view = SampleView.from_record(written, split=self.split, finish_reason=completion.finish_reason,
                                      record=record if self.coco_available else None)
        report = self.checker.check(view) if self.checker is not None else None
        reasons = report.reasons if report is not None else []
        signature = bands = None
        if self.near_duplicates_on:
            text = "\n".join(view.answers)
            if text.strip():
                signature = self.signer.signature(text)
                bands = self.signer.band_keys(signature)
        if reasons:
            # What failed, not only the code (the objects judged hallucinated, the repeated question, the box...).
            detail = "; ".join(f"{code}: {text}" for code, text in report.details.items())
            return Rejected(prepared.item_id, reasons, written, detail, evidence, signature, bands)
        return Accepted(prepared.item_id, written, signature, evidence, bands)

    def near_duplicate_gate(self, accepted_file: Path | None = None) -> NearDuplicateGate | None:
        """The run's near-duplicate gate, remembering what `accepted_file` (an earlier run's output) holds."""
        if not self.near_duplicates_on:
            return None
        gate = NearDuplicateGate(NearDuplicateIndex(self.quality.near_duplicate_threshold, self.quality.shingle_size,
                                                    self.quality.minhash_permutations))
        if accepted_file is not None and Path(accepted_file).is_file():
            repair_tail(Path(accepted_file))  # a killed run may have left half a line; the run would cut it anyway
            for rec in read_samples(Path(accepted_file)):
                gate.remember(str(rec.get("id", "")), "\n".join(SampleView.from_record(rec, split=self.split).answers))
        return gate
