"""The Batch API executor: the same planned requests as a live run, sent as OpenAI batch files.

`submit` plans the records exactly like the live engine (`RequestPlanner`: skip done ids, build the
request, key it, look it up): cache hits are written at once, the rest become request lines.
`collect` hands the downloaded completions to the same `ResultRecorder` and `OutputSink` a live run
uses, so the files are the same.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datagen.coco import CocoIndex, ImageRecord
from datagen.context import context_builder
from datagen.engine.batch_api import (BatchEntry, BatchState, custom_id, ids_in_request_file, request_file_lines,
                                      request_line, split_results, write_request_files, write_resubmit)
from datagen.engine.cost import Price
from datagen.engine.judging import InlineJudge
from datagen.engine.live import ResultRecorder
from datagen.engine.work import AlreadyDone, Completed, Endpoint, RequestPlanner, RunStats
from datagen.errors import VisinstructError
from datagen.prompts import PromptSet, load_prompt_set
from datagen.sample import OutputLayout
from datagen.sink import OutputSink
from datagen.task import LlavaTask

BACKEND = "openai"  # the Batch API is OpenAI's; cache keys match a live run with --backend openai


def load_state(layout: OutputLayout) -> BatchState:
    """The batch state beside an output; missing is a user error."""
    state = BatchState.load(layout.batch_state)
    if state is None:
        raise VisinstructError(f"no batch state beside {layout.samples} ({layout.batch_state})",
                               "run `datagen batch submit` first")
    return state


def prompts_of(state: BatchState) -> PromptSet:
    """The prompts a batch was submitted with; changed prompt files are a user error."""
    prompts = load_prompt_set(Path(state.prompts_dir) if state.prompts_dir else None, state.split)
    if prompts.hash != state.prompt_hash:
        raise VisinstructError(f"the {state.split} prompt files changed since this batch was submitted",
                               "restore them, or submit again to a new --out")
    return prompts


def task_of(state: BatchState, index: CocoIndex) -> LlavaTask:
    """The task a batch was submitted for (same prompts, sampling, context and gate as a live run).

    index: the split's COCO index (the negative split's absent objects are chosen by its co-occurrence counts).
    """
    cooccurrence = Path(state.cooccurrence_from) if state.cooccurrence_from else None
    context = context_builder(state.split, index, cooccurrence, state.sampling.seed, state.absent_objects)
    return LlavaTask(state.split, prompts_of(state), state.sampling, provenance={"backend": BACKEND}, context=context)


def recorder_for(task: LlavaTask, layout: OutputLayout, state: BatchState, stats: RunStats,
                 price: Price | None) -> ResultRecorder:
    """What stores batch results: the live run's recorder and sink, failures listed in the batch folder."""
    sink = OutputSink(layout, task.split, stats, task.near_duplicate_gate(layout.samples), layout.batch_failures)
    return ResultRecorder(InlineJudge(task), sink, stats, Endpoint(BACKEND, state.model), price,
                          Path(state.cache) if state.cache else None)


@dataclass
class SubmitPlan:
    """What `plan_submit` found: request lines to send and how many items the cache already answered."""

    lines: list[dict] = field(default_factory=list)
    from_cache: int = 0


def plan_submit(task: LlavaTask, layout: OutputLayout, state: BatchState, records: Iterable[ImageRecord]) -> SubmitPlan:
    """Plan the records like a live run; write cache hits now, return request lines for the rest."""
    in_flight: set[str] = set()
    for entry in state.batches:
        if not entry.collected:
            in_flight |= ids_in_request_file(Path(entry.request_file))
    endpoint = Endpoint(BACKEND, state.model)
    cache_path = Path(state.cache) if state.cache else None
    planner = RequestPlanner(task, endpoint, layout.done_ids() | in_flight, cache_path)
    plan = SubmitPlan()
    hits: list[Completed] = []
    planner.open()
    try:
        for item in planner.plan(records):
            if isinstance(item, AlreadyDone):
                continue
            if item.cached is not None:
                hits.append(Completed(item, item.cached, fresh=False))
            else:
                plan.lines.append(request_line(custom_id(item.item_id, task.split), state.model, item.request))
    finally:
        planner.close()
    if hits:  # already paid for: write them now, exactly as a live run would
        recorder = recorder_for(task, layout, state, RunStats(), None)
        recorder.open()
        try:
            recorder.record(hits)
        finally:
            recorder.close()
        plan.from_cache = len(hits)
    return plan


def add_request_files(state: BatchState, lines: list[dict], folder: Path) -> list[tuple[Path, int]]:
    """Write request lines as numbered files and list them in the state as batches to upload."""
    files = write_request_files(lines, folder, len(state.batches) + 1)
    for path, count in files:
        state.batches.append(BatchEntry(request_file=str(path), count=count))
    return files


def read_request_file(path: Path) -> list[dict]:
    """The lines of a request file given to `submit --requests` (e.g. a resubmit file)."""
    if not path.exists():
        raise VisinstructError(f"request file not found: {path}", "check the --requests path")
    return request_file_lines(path)


@dataclass
class CollectedBatch:
    """One batch's collection: results stored, and the resubmit file for the rest."""

    entry: BatchEntry
    results: int
    resubmit: Path | None


def collect_ready(layout: OutputLayout, state: BatchState, ready: list[tuple[BatchEntry, list, list]],
                  stats: RunStats, price: Price | None, save_state: Callable[[], None]) -> list[CollectedBatch]:
    """Store the completions of downloaded batches like a live run; write resubmit files for the failed."""
    index = CocoIndex(state.coco_root, state.coco_split, with_instances=LlavaTask.needs_boxes(state.split))
    task = task_of(state, index)
    done = layout.done_ids()
    recorder = recorder_for(task, layout, state, stats, price)
    planner = RequestPlanner(task, Endpoint(BACKEND, state.model), frozenset(), None)
    collected: list[CollectedBatch] = []
    recorder.open()
    try:
        for entry, outputs, errors in ready:
            completions, failed = split_results(entry, outputs, errors, state.model)
            results = []
            # In image order, so near-duplicates are decided as in a live run of the same items.
            for cid in sorted(completions, key=lambda c: int(c.split(":", 1)[0])):
                sid = cid.split(":", 1)[0]
                if sid in done:  # collected before (a rerun after a crash mid-collect)
                    continue
                item = planner.item(task.prepare(index.record(int(sid))))
                results.append(Completed(item, completions[cid], fresh=True))
                done.add(sid)
            recorder.record(results)
            resubmit = write_resubmit(entry, failed, layout.batch_dir)
            entry.collected, entry.succeeded, entry.failed = True, len(completions), len(failed)
            entry.resubmit_file = str(resubmit) if resubmit else None
            save_state()
            collected.append(CollectedBatch(entry, len(completions), resubmit))
    finally:
        recorder.close()
    return collected
