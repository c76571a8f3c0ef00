"""OpenAI Batch API: write request files, upload, create batches, collect results; state kept in a local file."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from datagen.backends.base import ChatRequest, Completion, SamplingParams
from datagen.backends.openai_backend import chat_body, classify_error, completion_from_body
from datagen.context import DEFAULT_ABSENT_OBJECTS
from datagen.engine.errors import TransientError
from datagen.errors import VisinstructError
from datagen.outputs import AtomicFile, write_bytes_atomic, write_text_atomic
from datagen.inputs import InputError, iter_jsonl_records, parse_json, read_text

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

MAX_REQUESTS_PER_BATCH = 50_000  # OpenAI's per-file limit
ENDPOINT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def custom_id(sample_id: str, split: str) -> str:
    return f"{sample_id}:{split}"


class BatchEntry(BaseModel):
    """One uploaded request file and the batch made from it."""

    request_file: str
    count: int
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str = "written"  # written -> uploaded -> the API's status (validating ... completed/expired/...)
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = {}
    collected: bool = False
    succeeded: int = 0
    failed: int = 0
    resubmit_file: str | None = None


class BatchState(BaseModel):
    """Everything `status` and `collect` need, so they only take --out."""

    split: str
    model: str
    base_url: str | None
    coco_root: str
    coco_split: str
    prompts_dir: str | None
    prompt_hash: str
    params: dict[str, Any]
    cache: str | None
    # Negative split's context: absent objects per image and the co-occurrence file (None: the split's own).
    absent_objects: int = DEFAULT_ABSENT_OBJECTS
    cooccurrence_from: str | None = None
    batches: list[BatchEntry] = []

    @classmethod
    def load(cls, path: Path) -> "BatchState | None":
        if not path.exists():
            return None
        text = read_text(path, "batch state file")
        parse_json(text, path, 1, "restore it from a backup, or move it away to start over")  # the input layer's checks
        try:
            return cls.model_validate_json(text)
        except ValueError as exc:
            raise VisinstructError(f"{path} is not a batch state file ({str(exc).splitlines()[0]})",
                                   "restore it from a backup, or move it away to start over") from None

    def save(self, path: Path) -> None:
        """Write to a temporary file and rename, so a crash never leaves half a state file."""
        write_text_atomic(path, self.model_dump_json(indent=1))

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(**self.params)


def request_line(cid: str, model: str, request: ChatRequest) -> dict[str, Any]:
    """One line of a Batch API input file: the body a live request would send."""
    return {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": chat_body(model, request)}


def request_file_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of a Batch API request file, each with a string custom_id (else a user error naming the line)."""
    lines = []
    for lineno, line in iter_jsonl_records(path, "request file"):
        if not isinstance(line.get("custom_id"), str):
            raise InputError(path, 'a request line without a string "custom_id"',
                             "pass a request file written by `datagen batch` (e.g. a resubmit file)", lineno)
        lines.append(line)
    return lines


def ids_in_request_file(path: Path) -> set[str]:
    """Sample ids named by the custom_ids of a request file."""
    return {line["custom_id"].split(":", 1)[0] for line in request_file_lines(path)}


def write_request_files(lines: Iterable[dict[str, Any]], folder: Path, first_number: int) -> list[tuple[Path, int]]:
    """Split request lines into files of at most MAX_REQUESTS_PER_BATCH; return (path, count) per file."""
    written: list[tuple[Path, int]] = []
    fh: AtomicFile | None = None
    count, number = 0, first_number
    try:
        for line in lines:
            if fh is None:
                fh, count = AtomicFile(folder / f"requests-{number:03d}.jsonl"), 0
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            count += 1
            if count >= MAX_REQUESTS_PER_BATCH:
                written.append((fh.commit(), count))
                fh, number = None, number + 1
        if fh is not None:
            written.append((fh.commit(), count))
    finally:
        if fh is not None:
            fh.abort()  # nothing once committed; after a failure, no half-written request file is left
    return written


async def call_api(what: str, coro, base_url: str | None, model: str):
    """Await an SDK call; errors become one actionable VisinstructError (state is saved before each call)."""
    import openai  # the SDK is slow to import: only the Batch API commands, not the CLI's start-up, pay for it

    try:
        return await coro
    except openai.APIError as exc:
        err = classify_error(exc, base_url, model)
        if isinstance(err, VisinstructError):
            raise err from None
        reason = err.reason if isinstance(err, TransientError) else str(exc)
        raise VisinstructError(f"Batch API {what} failed: {reason}", "rerun the same command; finished steps are kept") from None


async def upload_and_create(client: openai.AsyncOpenAI, state: BatchState, state_file: Path) -> list[BatchEntry]:
    """Advance every entry that is written or uploaded to a created batch, saving state after each step."""
    created = []
    for entry in state.batches:
        if entry.status == "written":
            data = Path(entry.request_file).read_bytes()
            uploaded = await call_api("upload", client.files.create(file=(Path(entry.request_file).name, data),
                                                                    purpose="batch"), state.base_url, state.model)
            entry.input_file_id, entry.status = uploaded.id, "uploaded"
            state.save(state_file)
        if entry.status == "uploaded":
            batch = await call_api("create", client.batches.create(
                input_file_id=entry.input_file_id, endpoint=ENDPOINT, completion_window="24h",
                metadata={"tool": "visinstruct", "split": state.split}), state.base_url, state.model)
            entry.batch_id, entry.status = batch.id, batch.status
            state.save(state_file)
            created.append(entry)
    return created


async def refresh(client: openai.AsyncOpenAI, state: BatchState, state_file: Path) -> None:
    """Update status, counts and result file ids of every batch not yet collected."""
    for entry in state.batches:
        if entry.batch_id and not entry.collected:
            batch = await call_api("status", client.batches.retrieve(entry.batch_id), state.base_url, state.model)
            entry.status = batch.status
            entry.output_file_id = batch.output_file_id
            entry.error_file_id = batch.error_file_id
            if batch.request_counts is not None:
                entry.counts = {"total": batch.request_counts.total, "completed": batch.request_counts.completed,
                                "failed": batch.request_counts.failed}
    state.save(state_file)


async def download_lines(client: openai.AsyncOpenAI, file_id: str | None, state: BatchState, keep: Path) -> list[dict]:
    """Lines of a result file, saved under `keep` too (so a collect can be redone without the network)."""
    if not file_id:
        return []
    if not keep.exists():
        content = await call_api("download", client.files.content(file_id), state.base_url, state.model)
        write_bytes_atomic(keep, content.content)
    lines = []
    with open(keep, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            # A bad line costs its item a resubmit, not the whole collect: it goes through the input layer's checks.
            try:
                line = parse_json(raw.decode("utf-8"), keep, lineno)
            except (UnicodeDecodeError, InputError):
                line = None
            if isinstance(line, dict):
                lines.append(line)
            else:
                log.warning("%s:%d is not a JSON object; its item will be resubmitted", keep, lineno)
    return lines


def completion_of_result(line: dict[str, Any], model: str) -> Completion | None:
    """The completion inside one output line, or None when that request failed."""
    response = line.get("response") or {}
    if line.get("error") or response.get("status_code") != 200:
        return None
    try:
        return completion_from_body(response.get("body"), model)
    except TransientError:
        return None


def split_results(entry: BatchEntry, outputs: list[dict], errors: list[dict], model: str
                  ) -> tuple[dict[str, Completion], set[str]]:
    """Completions by custom_id, and the custom_ids to resubmit (failed, malformed, expired or missing)."""
    requested = [line["custom_id"] for line in request_file_lines(Path(entry.request_file))]
    results: dict[str, Completion] = {}
    for line in outputs:
        completion = completion_of_result(line, model)
        cid = line.get("custom_id")
        if completion is not None and cid:
            results[cid] = completion
    failed = {cid for cid in requested if cid not in results}
    # Every id without a usable result is resubmitted; the error file only says why, so it is logged.
    for line in errors:
        log.info("batch item %s failed: %s", line.get("custom_id"), (line.get("error") or line.get("response") or {}))
    return results, failed


def write_resubmit(entry: BatchEntry, failed: set[str], folder: Path) -> Path | None:
    """The original request lines of the failed items, ready for `datagen batch submit --requests`."""
    if not failed:
        return None
    path = folder / f"resubmit-{Path(entry.request_file).stem.removeprefix('requests-')}.jsonl"
    keep = [line for line in request_file_lines(Path(entry.request_file)) if line["custom_id"] in failed]
    write_text_atomic(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in keep))
    return path
