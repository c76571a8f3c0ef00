"""The generation run: records -> prompts -> completions -> samples -> JSONL."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datagen.backends.base import Backend, ChatRequest, Completion, SamplingParams
from datagen.coco import ImageRecord
from datagen.context import render_context
from datagen.errors import VisinstructError
from datagen.jsonl import JsonlWriter, iter_jsonl, repair_tail
from datagen.parse import ParseError, build_sample
from datagen.prompts import SPLITS_WITH_BOXES, PromptSet, pick_instruction
from datagen.schema import Sample

log = logging.getLogger(__name__)


def sample_id(image_id: int) -> str:
    """LLaVA's id convention: the zero-padded COCO image id."""
    return f"{image_id:012d}"


def rejects_path(out: Path) -> Path:
    """Where unparseable outputs of `out` go: data/detail.jsonl -> data/detail.rejects.jsonl."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejects.jsonl")


def runs_path(out: Path) -> Path:
    """The run manifest log beside `out`: one JSON line per run."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".runs.jsonl")


def done_ids(*paths: Path) -> set[str]:
    """Ids already written (accepted or rejected) by earlier runs into these files."""
    seen: set[str] = set()
    for path in paths:
        if path.exists():
            repair_tail(path)
            seen.update(str(r.get("id")) for r in iter_jsonl(path))
    return seen


@dataclass
class RunStats:
    """Counters a run reports at the end and records in its manifest."""

    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Job:
    """One generation run's fixed settings."""

    split: str
    prompts: PromptSet
    params: SamplingParams
    out: Path
    concurrency: int
    checker: Checker | None = None


ProgressFn = Callable[[RunStats], None]
# A quality gate: given the parsed sample, its image record and the raw completion, the reject
# reason codes (empty list = accept). Stateful checkers (near-duplicates) keep state across calls.
Checker = Callable[[Sample, ImageRecord, Completion], list[str]]


def build_request(job: Job, record: ImageRecord) -> tuple[ChatRequest, str]:
    """The chat request for one image, and the context text the writer sees."""
    context = render_context(record, with_boxes=job.split in SPLITS_WITH_BOXES)
    request = ChatRequest(key=f"{record.id}:{job.split}", messages=job.prompts.messages(context), params=job.params)
    return request, context


async def run_generation(
    job: Job,
    backend: Backend,
    records: Iterable[ImageRecord],
    on_progress: ProgressFn | None = None,
) -> RunStats:
    """Generate samples for `records` not already in the output, writing each as it completes."""
    stats = RunStats()
    started = time.perf_counter()
    reject_file = rejects_path(job.out)
    skip = done_ids(job.out, reject_file)
    fatal: list[BaseException] = []
    meta_base = {"backend": backend.name, "prompt_hash": job.prompts.hash, "seed": job.params.seed}

    with JsonlWriter(job.out) as accepted, JsonlWriter(reject_file) as rejected:

        async def process(record: ImageRecord) -> None:
            request, context = build_request(job, record)
            try:
                completion = await backend.complete(request)
            except VisinstructError as exc:
                fatal.append(exc)
                return
            except Exception as exc:  # transient failure after the backend's retries: not written, retried next run
                stats.failed += 1
                stats.failures.append(f"{record.id}: {type(exc).__name__}: {exc}")
                return
            stats.prompt_tokens += completion.prompt_tokens
            stats.completion_tokens += completion.completion_tokens
            meta = {
                **meta_base,
                "model": completion.model,
                "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
                "finish_reason": completion.finish_reason,
            }
            instruction = pick_instruction(job.prompts.instructions, record.id, job.params.seed) if job.split == "detail" else None
            try:
                sample = build_sample(
                    split=job.split,
                    text=completion.text,
                    sample_id=sample_id(record.id),
                    image=record.file_name,
                    instruction=instruction,
                    meta=meta,
                    truncated=completion.truncated,
                )
                reasons = job.checker(sample, record, completion) if job.checker else []
                detail = ""
            except ParseError as exc:
                sample, reasons, detail = None, [exc.code], exc.detail
            if reasons:
                stats.rejected += 1
                for code in reasons:
                    stats.reject_reasons[code] = stats.reject_reasons.get(code, 0) + 1
                entry = sample.to_record() if sample else {"id": sample_id(record.id), "image": record.file_name, "split": job.split}
                rejected.write({**entry, "reject_reasons": reasons, "detail": detail, "context": context, "raw": completion.text, "meta": meta})
            else:
                stats.accepted += 1
                accepted.write(sample.to_record())
            if on_progress:
                on_progress(stats)

        gate = asyncio.Semaphore(max(1, job.concurrency))
        tasks: set[asyncio.Task] = set()
        for record in records:
            if fatal:
                break
            if sample_id(record.id) in skip:
                stats.skipped += 1
                if on_progress:
                    on_progress(stats)
                continue
            await gate.acquire()
            task = asyncio.create_task(process(record))
            task.add_done_callback(lambda t: (gate.release(), tasks.discard(t)))
            tasks.add(task)
        if tasks:
            await asyncio.gather(*tasks)
    stats.elapsed_s = time.perf_counter() - started
    if fatal:
        raise fatal[0]
    return stats


def write_manifest(out: Path, settings: dict[str, Any], stats: RunStats) -> None:
    """Append this run's settings and results to the manifest log beside the output."""
    entry = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **settings, "stats": asdict(stats)}
    with open(runs_path(out), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
