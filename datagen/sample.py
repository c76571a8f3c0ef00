"""The LLaVA sample, in one place: the model, its validation, reading and writing, and the files beside an output.

Generation, the Batch API, `check`, `export`, `merge` and the trainer's reader all use this module; a
second place that restates the format is a bug waiting to happen.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from datagen.errors import VisinstructError
from datagen.hf_dataset import hf_files, hub_repo_id, is_hf_input, iter_parquet_records
from datagen.inputs import InputError, first_char, iter_jsonl_records, json_type, load_json, short_json
from datagen.jsonl import iter_jsonl, repair_tail
from datagen.outputs import AtomicFile, lock_path
from datagen.splits import SPLITS

IMAGE_TOKEN = "<image>"
SPLIT_NAMES = (*SPLITS, "captions")
LLAVA_HINT = 'each sample needs "conversations": [{"from": "human"|"gpt", "value": "..."}, ...]'
CACHE_FILE = Path(".cache") / "responses.sqlite"


def sample_id(image_id: int) -> str:
    """LLaVA's id convention: the zero-padded COCO image id."""
    return f"{image_id:012d}"


def turn_problems(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(reason code, detail) for every way the turns break LLaVA's shape; empty when the turns are valid."""
    problems: list[tuple[str, str]] = []
    if len(turns) < 2 or len(turns) % 2:
        problems.append(("bad_roles", "a sample needs an even number (>= 2) of turns"))
    for i, (speaker, value) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker != expected:
            problems.append(("bad_roles", f"turn {i} is from {speaker!r}, expected {expected!r}"))
        if not value.strip():
            problems.append(("empty_turn", f"turn {i} is empty"))
        count = value.count(IMAGE_TOKEN)
        if i == 0 and (count != 1 or not value.startswith(IMAGE_TOKEN)):
            problems.append(("image_token", "<image> must appear once, at the start of the first human turn"))
        if i > 0 and count:
            problems.append(("image_token", f"<image> appears in turn {i}"))
    return problems


_JSON_SCALARS = (str, int, float, bool, type(None))


def _plain_copy(value: Any) -> Any:
    """A copy of a JSON-plain value (str, int, float, bool, None; lists; dicts with str keys), or raise TypeError."""
    kind = type(value)
    if kind in _JSON_SCALARS:
        return value
    if kind is dict:
        if not all(type(key) is str for key in value):
            raise TypeError("a key that is not a string")
        return {key: _plain_copy(item) for key, item in value.items()}
    if kind is list:
        return [_plain_copy(item) for item in value]
    raise TypeError(f"a {kind.__name__}")


def plain_record(sample_id: Any, image: Any, turns: list[tuple[Any, Any]], split: Any,
                 meta: Any) -> dict[str, Any] | None:
    """`Sample(id=..., image=..., conversations=[{"from": s, "value": v}, ...], split=..., meta=...).to_record()`,
    built without the model when the model would take every field as it is: strings, turns that pass
    `turn_problems`, and a meta of plain JSON values (copied, as the model copies it).

    None otherwise: the caller then builds the model, which converts the field or refuses it with its own message.
    Parsing a completion builds one record per completion, and the model's validation and dump cost more than
    several of the checks that then read it; tests/test_quality_speed_equivalence.py pins that both agree.
    """
    if not (type(sample_id) is str and type(image) is str and type(split) is str):
        return None
    if not all(type(speaker) is str and type(value) is str for speaker, value in turns) or turn_problems(turns):
        return None
    try:
        meta = _plain_copy(meta) if meta is not None else None
    except (TypeError, RecursionError):
        return None
    if meta is not None and type(meta) is not dict:
        return None
    record = {"id": sample_id, "image": image,
              "conversations": [{"from": speaker, "value": value} for speaker, value in turns], "split": split}
    if meta is not None:
        record["meta"] = meta
    return record


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
        problems = turn_problems([(t.speaker, t.value) for t in self.conversations])
        if problems:
            raise ValueError(problems[0][1])
        return self

    def to_record(self) -> dict[str, Any]:
        """The JSON object written to disk (LLaVA's keys first)."""
        return self.model_dump(by_alias=True, exclude_none=True)


def require_llava(rec: Any, where: str) -> dict[str, Any]:
    """The record if it has LLaVA's shape (a conversations list of from/value strings), else a user error.

    A bad `image` (not a string, or a path out of its folder) is not a shape error: the image path rule
    (`image_path_problem`) makes it the reason code bad_image_path, and export drops such samples.

    where: "<file>:<line>" or "<file> item <i>", the start of the message.
    """
    if not isinstance(rec, dict):
        raise VisinstructError(f"{where}: a JSON {json_type(rec)}, not a sample object", LLAVA_HINT)
    turns = rec.get("conversations")
    if turns is None and isinstance(rec.get("reject_reasons"), list):
        return rec  # a generation reject that never parsed (raw text only): kept for stats and review
    if not isinstance(turns, list):
        raise VisinstructError(f'{where}: not a LLaVA-format sample (no "conversations" list)', LLAVA_HINT)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise VisinstructError(f'{where}: turn {i} is not an object with string "from" and "value"', LLAVA_HINT)
    return rec


# --- image paths: the one rule ---------------------------------------------------------------------

BAD_IMAGE_PATH_HINT = ("an image path is relative to the image folder, without '..', a URL or a link out of it; "
                       "fix or drop the sample (`datagen check` flags it as bad_image_path)")
# A scheme ("javascript:", "file:", "https:") or a drive ("C:"): never a file name inside the folder.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class ImagePathError(VisinstructError):
    """A sample's image names no file inside its image folder."""

    def __init__(self, image: object, problem: str) -> None:
        super().__init__(f"image {image!r} {problem}", BAD_IMAGE_PATH_HINT)
        self.image = image
        self.problem = problem


def image_path_problem(image: object) -> str | None:
    """Why an `image` value cannot name a file inside an image folder, from the value alone; None if it can."""
    if not isinstance(image, str):
        return f"is not a string but {type(image).__name__}"
    if not image:
        return "is empty"
    if "\x00" in image:
        return "contains a NUL byte"
    if _CONTROL.search(image):
        return "contains a control character"
    if image.startswith(("/", "\\")):
        return "is an absolute path"
    if _SCHEME.match(image):
        return "is a URL or a drive path"
    if "\\" in image:
        return "contains a backslash (write folders with '/')"
    if ".." in image.split("/"):
        return "climbs out of its folder with '..'"
    return None


def resolve_image(folder: Path | str, image: object, trusted: Sequence[Path] = ()) -> Path:
    """The file `image` names inside `folder`; ImagePathError when it would land anywhere else.

    The name must pass image_path_problem, and the path, symbolic links followed, must stay inside the
    folder. trusted: folders the tool itself fills (the trainer's cache of images extracted from a
    dataset), whose files a record may name by absolute path.
    """
    if isinstance(image, str) and image.startswith("/") and trusted:
        for root in trusted:
            if _inside(Path(image), Path(root)):
                return Path(image)
    problem = image_path_problem(image)
    if problem is not None:
        raise ImagePathError(image, problem)
    path = Path(folder) / str(image)
    if not _inside(path, Path(folder)):
        raise ImagePathError(image, f"leads out of {folder} through a symbolic link")
    return path


def _inside(path: Path, root: Path) -> bool:
    """Whether the path, symbolic links followed (it need not exist), lies inside root."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long, an embedded NUL
        return False


def read_samples(path: Path | str, extract_images_to: Path | None = None) -> Iterator[dict[str, Any]]:
    """Samples of a JSONL file, a JSON array file, an exported HF dataset folder or hf://org/name, each
    shape-checked: the one reader of sample files (bytes and JSON go through datagen.inputs).

    extract_images_to: an HF dataset's embedded images are written there once and the samples name those
    files (the trainer); without it the image bytes are not read and the stored path is the image.
    """
    if is_hf_input(path):
        yield from _read_hf_dataset(path, extract_images_to)
        return
    path = Path(path)
    if not path.exists():
        raise VisinstructError(f"file not found: {path}", "pass an existing JSONL or JSON file of samples")
    first = first_char(path, "sample file")
    if first == "[":
        for i, rec in enumerate(load_json(path, "sample file")):
            yield require_llava(rec, f"{path} item {i}")
    elif first in ("{", ""):
        for lineno, rec in iter_jsonl_records(path, "sample file"):
            yield require_llava(rec, f"{path}:{lineno}")
    else:
        raise VisinstructError(f"{path}: neither JSONL nor a JSON array", "pass LLaVA-format samples as JSONL or a JSON list")


def _read_hf_dataset(path: Path | str, extract_images_to: Path | None) -> Iterator[dict[str, Any]]:
    """Rows of an HF dataset's Parquet shards, or the LLaVA JSON files of a Hub repo that has no Parquet."""
    files = hf_files(path)
    for i, rec in enumerate(iter_parquet_records(files.parquet, extract_images_to)):
        yield require_llava(rec, f"{path} row {i}")
    for json_file in files.json:
        split = split_from_filename(json_file)  # conversation_58k.json -> conversation
        for rec in read_samples(json_file):
            yield rec if "split" in rec or split is None else {**rec, "split": split}


def split_from_filename(path: Path) -> str | None:
    """A split named by the file: conversation_58k.json -> conversation, complex_reasoning_77k -> reasoning."""
    name = Path(path).name.lower()
    for split in SPLIT_NAMES:
        if split in name or (split == "captions" and "caption" in name):
            return split
    return None


def sample_split(rec: dict[str, Any], fallback: str | None) -> str | None:
    """The record's own split field, else the fallback (a flag or the file name)."""
    value = rec.get("split")
    return value if isinstance(value, str) and value else fallback


def writes_json_array(path: Path | str) -> bool:
    """The one rule for every sample file the tool writes: a name ending in .json gets a JSON array, others JSONL."""
    return Path(path).suffix.lower() == ".json"


class SampleWriter:
    """Writes a whole new sample file: a JSON array if the name ends in .json, else JSONL.

    Written to a temporary file beside `path` (datagen.outputs.AtomicFile): `close()` (or the end of a `with`
    block) puts it in place; `abort()` (or an exception in the block) leaves an existing file untouched.
    `flag`: the option that named `path`, for errors (a folder given as the path, a full disk).
    """

    def __init__(self, path: Path, flag: str = "--out") -> None:
        self.path = Path(path)
        self.as_array = writes_json_array(self.path)
        self._out = AtomicFile(self.path, flag=flag)
        self._finished = False
        self.count = 0
        if self.as_array:
            self._out.write("[")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        if self.as_array:
            self._out.write(("," if self.count else "") + "\n" + line)
        else:
            self._out.write(line + "\n")
        self.count += 1

    def finish(self) -> None:
        """Write the closing bracket (a JSON array) and put the data on disk, not yet under `path`."""
        if self._out.done or self._finished:
            return
        if self.as_array:
            self._out.write("\n]\n")
        self._finished = True
        self._out.finish()

    def commit(self) -> None:
        """Rename the finished file over `path`."""
        self.finish()
        self._out.commit()

    def close(self) -> None:
        """Finish the file and rename it over `path`."""
        self.commit()

    def abort(self) -> None:
        """Drop what was written; `path` stays as it was."""
        self._out.abort()

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ManifestEntry(BaseModel):
    """One line of a run manifest (X.runs.jsonl) as its readers use it; other keys (older manifests) pass unchecked."""

    model_config = ConfigDict(extra="allow", strict=True)

    shard: str | None = None
    images: int | None = Field(None, ge=0)
    finished_at: str | None = None
    command: str | None = None
    config: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None


def read_manifest(path: Path) -> Iterator[tuple[int, ManifestEntry]]:
    """(line, entry) of a run manifest through the input layer; a field of the wrong type names the line.

    A killed run's half-written last line is skipped (the manifest is only read).
    """
    hint = f"fix or delete that line of {Path(path).name} (the run manifest: a record, not data)"
    for lineno, record in iter_jsonl_records(path, "run manifest", skip_partial_tail=True):
        try:
            yield lineno, ManifestEntry.model_validate(record)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else "?"
            raise InputError(path, f'"{name}" is {short_json(record.get(name))} ({error["msg"].lower()})', hint,
                             lineno) from None


def default_cache_path(out_dir: Path = Path("data")) -> Path:
    """`$VISINSTRUCT_CACHE`, else .cache/responses.sqlite in the output folder (shared by its splits)."""
    env = os.environ.get("VISINSTRUCT_CACHE")
    return Path(env) if env else Path(out_dir) / CACHE_FILE


@dataclass(frozen=True)
class OutputLayout:
    """Every file written beside a generation output: data/detail.jsonl -> data/detail.rejects.jsonl, ..."""

    samples: Path

    @classmethod
    def default(cls, split: str, shard: str | None = None, directory: Path | str = "data") -> "OutputLayout":
        """<directory>/<split>.jsonl, or <directory>/<split>.shard-K-of-N.jsonl for shard "K/N" (directory: data/)."""
        suffix = ".shard-{}-of-{}".format(*shard.split("/")) if shard else ""
        return cls(Path(directory) / f"{split}{suffix}.jsonl")

    def _beside(self, suffix: str) -> Path:
        return self.samples.with_name(self.samples.name.removesuffix(".jsonl") + suffix)

    @property
    def stem(self) -> str:
        return self.samples.name.removesuffix(".jsonl")

    @property
    def rejects(self) -> Path:
        """Rejected samples with their reasons: data/detail.rejects.jsonl."""
        return self._beside(".rejects.jsonl")

    @property
    def runs(self) -> Path:
        """The run manifest log: one JSON line per run (the run's config and stats)."""
        return self._beside(".runs.jsonl")

    @property
    def failures(self) -> Path:
        """Items of the latest live run that exhausted their retries."""
        return self._beside(".failures.jsonl")

    @property
    def batch_state(self) -> Path:
        """The Batch API state file: data/detail.batch.json."""
        return self._beside(".batch.json")

    @property
    def batch_dir(self) -> Path:
        """Batch API request, result and resubmit files: data/detail.batch/."""
        return self._beside(".batch")

    @property
    def batch_failures(self) -> Path:
        """Items of a Batch API collect that could not be stored."""
        return self.batch_dir / "failures.jsonl"

    @property
    def judged(self) -> Path:
        """Samples `datagen judge` kept: data/detail.judged.jsonl."""
        return self._beside(".judged.jsonl")

    @property
    def judge_rejects(self) -> Path:
        """Samples `datagen judge` scored below --min-score, with the judge's reason: data/detail.judge-rejects.jsonl."""
        return self._beside(".judge-rejects.jsonl")

    @property
    def default_cache(self) -> Path:
        """The response cache a run uses unless told otherwise (shared by the outputs of one folder)."""
        return default_cache_path(self.samples.parent)

    def done_ids(self, repair: bool = True) -> set[str]:
        """Ids already written (accepted or rejected) by earlier runs.

        repair: cut a half-written last line first (only under the output's lock, see datagen.outputs);
        without it such a line is skipped and the files are left as they are (a dry run).
        """
        seen: set[str] = set()
        for path in (self.samples, self.rejects):
            if path.exists():
                if repair:
                    repair_tail(path)
                seen.update(str(r.get("id")) for r in iter_jsonl(path, skip_partial_tail=not repair))
        return seen

    @property
    def lock(self) -> Path:
        """The output lock of a running generation: data/detail.jsonl.lock."""
        return lock_path(self.samples)

# --- the files the tool writes beside an output, as inputs --------------------------------------------

REJECTS_KIND = "rejects"
# What each OutputLayout file is called when an input is skipped; the suffixes come from OutputLayout itself.
_KIND_OF_PROPERTY = {"runs": "run manifest", "failures": "failures list", "batch_state": "Batch API state",
                     "rejects": REJECTS_KIND, "judge_rejects": REJECTS_KIND}


def _suffixes() -> dict[str, str]:
    probe = OutputLayout(Path("x.jsonl"))
    return {getattr(probe, name).name.removeprefix(probe.stem): kind for name, kind in _KIND_OF_PROPERTY.items()}


_BESIDE_SUFFIXES = _suffixes()
_BATCH_DIR_SUFFIX = OutputLayout(Path("x.jsonl")).batch_dir.name.removeprefix("x")


def _beside_match(path: Path | str) -> tuple[str, Path] | None:
    """(kind, the samples file it sits beside) when the tool wrote `path` beside an output, else None."""
    if hub_repo_id(path) is not None:
        return None
    path = Path(path)
    for part in (path, *path.parents):
        if part.name.endswith(_BATCH_DIR_SUFFIX) and len(part.name) > len(_BATCH_DIR_SUFFIX):
            return "Batch API files", part.with_name(part.name.removesuffix(_BATCH_DIR_SUFFIX) + ".jsonl")
    name = path.name
    for suffix, kind in _BESIDE_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return kind, path.with_name(name.removesuffix(suffix) + ".jsonl")
    return None


def written_beside_kind(path: Path | str) -> str | None:
    """What a file is when the tool wrote it beside an output (OutputLayout's names), else None (a sample file).

    data/detail.runs.jsonl -> "run manifest"; data/detail.rejects.jsonl -> "rejects"; anything in or named
    data/detail.batch/ -> "Batch API files". A hub id (hf://...) is never one.
    """
    match = _beside_match(path)
    return match[0] if match else None


def samples_beside(path: Path | str) -> Path | None:
    """The samples file a file the tool wrote sits beside: data/detail.runs.jsonl -> data/detail.jsonl."""
    match = _beside_match(path)
    return match[1] if match else None


@dataclass(frozen=True)
class SampleInputs:
    """A command's input paths split into the sample files to read and the tool's own files it skips."""

    read: list[Path]
    skipped: list[tuple[Path, str]]  # (path, kind)

    def note(self, rejects_flag: str | None = "--with-rejects") -> str | None:
        """One line saying what was skipped and why, or None when nothing was."""
        if not self.skipped:
            return None
        listed = ", ".join(f"{p} ({kind})" for p, kind in self.skipped)
        hint = ""
        if rejects_flag and any(kind == REJECTS_KIND for _, kind in self.skipped):
            hint = f"; pass {rejects_flag} to read rejects files too"
        return f"note: skipped {len(self.skipped)} file(s) datagen writes beside its outputs: {listed}{hint}"


def sample_inputs(paths: list[Path], with_rejects: bool = False, rejects_readable: bool = True) -> SampleInputs:
    """Sort a command's inputs: sample files are read; manifests, failures and Batch API state are skipped;
    rejects files are read when asked (with_rejects, or when every input given is a rejects file, as in
    `datagen stats data/*.rejects.jsonl`). A glob like data/*.jsonl therefore reads only the samples.

    rejects_readable: False for a command that finds the rejects beside each input itself (`merge`).
    Raises a user error when nothing is left to read.
    """
    kinds = [(p, written_beside_kind(p)) for p in paths]
    only_rejects = rejects_readable and bool(kinds) and all(kind == REJECTS_KIND for _, kind in kinds)
    with_rejects = with_rejects and rejects_readable
    read, skipped = [], []
    for path, kind in kinds:
        if kind is None or (kind == REJECTS_KIND and (with_rejects or only_rejects)):
            read.append(path)
        else:
            skipped.append((path, kind))
    if not read:
        listed = ", ".join(f"{p} ({kind})" for p, kind in skipped)
        raise VisinstructError(f"no sample file among the inputs, only files datagen writes beside its outputs: {listed}",
                               f"pass the samples file itself, e.g. {samples_beside(skipped[0][0])}")
    return SampleInputs(read, skipped)
