"""Hugging Face datasets: the row format (to_row/from_row), and the files of an exported folder or hf://org/name.

`datagen.sample.read_samples` reads HF inputs through this module; writing a folder is `datagen.hf_export`.
This module imports no other datagen module but errors, so the one reader can use it without an import circle.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datagen.errors import VisinstructError
from datagen.inputs import InputError, json_type, parse_json, read_text

HF_SCHEME = "hf://"
DATA_FOLDER = "data"
HF_SPLIT = "train"  # the one Hugging Face split; ours (conversation, detail, ...) are a column and configs
EXTRA_COLUMN = "extra"
IMAGE_CACHE_ENV = "VISINSTRUCT_IMAGE_CACHE"  # the folder the trainer extracts embedded images into
INSTALL_HINT = "install the hf extra: pip install 'visinstruct[hf]'"
# Meta fields that `generate` writes, stored as typed columns; anything else goes into the JSON `extra` column.
META_COLUMNS: dict[str, str] = {
    "model": "string", "backend": "string", "prompt_hash": "string", "seed": "int64", "finish_reason": "string",
}
USAGE_FIELDS = ("prompt_tokens", "completion_tokens")
SAFE_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TURN_KEYS = {"from", "value"}


@dataclass
class HfExportOptions:
    """How `datagen export --format hf` writes the folder."""

    embed_images: bool = False
    image_root: Path | None = None  # image paths are written relative to this folder
    images_dir: Path | None = None  # where the samples' image names resolve now (default: image_root)
    keep_missing: bool = False
    split: str | None = None  # treat every sample as this split
    mix: dict[str, float] | None = None  # None keeps every accepted sample
    seed: int = 0
    total: int | None = None
    rows_per_group: int = 1000  # rows buffered before a Parquet row group is written (bounds memory)
    group_bytes: int = 32 << 20  # ... or this many bytes of row data, whichever comes first
    shard_bytes: int = 500 << 20  # a new shard file starts past this size (the Hub's usual shard size)


@dataclass
class HfExportReport:
    """What an HF export wrote, per split, and what it left out."""

    written: int = 0
    per_split: Counter = field(default_factory=Counter)
    available: Counter = field(default_factory=Counter)
    skipped_rejected: int = 0
    missing_images: int = 0
    bad_image_paths: int = 0  # samples whose image path leads outside the image folder (never written)
    duplicate_ids: int = 0  # second copies of a (split, id) dropped
    shards: list[str] = field(default_factory=list)
    bytes_written: int = 0  # row data before compression (the card's num_bytes)
    file_bytes: int = 0  # Parquet files on disk (the card's download_size)
    writer_models: Counter = field(default_factory=Counter)  # model -> samples written
    prompt_hashes: dict[str, set[str]] = field(default_factory=dict)  # split -> prompt hashes of its samples

    def as_dict(self) -> dict[str, Any]:
        return {
            "written": self.written, "per_split": dict(sorted(self.per_split.items())),
            "available": dict(sorted(self.available.items())), "skipped_rejected": self.skipped_rejected,
            "missing_images": self.missing_images, "bad_image_paths": self.bad_image_paths, "duplicate_ids": self.duplicate_ids, "shards": self.shards, "bytes_written": self.bytes_written,
        }


# --- recognising an HF input ---------------------------------------------------------------------


def hub_repo_id(path: str | Path) -> str | None:
    """The repo id of "hf://org/name" (also as pathlib writes it, "hf:/org/name"), else None."""
    text = str(path)
    for prefix in (HF_SCHEME, "hf:/"):
        if text.startswith(prefix):
            repo = text[len(prefix):].strip("/")
            if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?", repo):
                raise VisinstructError(f"{text!r} is not a Hub dataset id", "write hf://org/name (or hf://org/name@revision)")
            return repo
    return None


def is_hf_input(path: str | Path) -> bool:
    """True for hf://org/name and for a local folder (an exported dataset); cheap: no heavy imports."""
    return hub_repo_id(path) is not None or Path(path).is_dir()


# --- the row format ------------------------------------------------------------------------------------


def pyarrow_modules():
    """pyarrow and pyarrow.parquet, imported on use: an optional dependency (the hf extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise VisinstructError("pyarrow is not installed (needed for Hugging Face datasets)", INSTALL_HINT) from None
    return pa, pq


def arrow_schema(embed_images: bool):
    """The Parquet schema, with the `huggingface` features metadata that `datasets` reads."""
    pa, _ = pyarrow_modules()
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if embed_images else pa.string()
    fields = [
        ("id", pa.string()), ("image", image), ("conversations", pa.list_(turn)), ("split", pa.string()),
        *[(name, getattr(pa, kind)()) for name, kind in META_COLUMNS.items()],
        ("usage", pa.struct([(f, pa.int64()) for f in USAGE_FIELDS])),
        (EXTRA_COLUMN, pa.string()),
    ]
    value = {"dtype": "string", "_type": "Value"}
    features = {
        "id": value, "image": {"_type": "Image"} if embed_images else value,
        # The list-of-dict form: read by datasets 2.x to 5.x alike.
        "conversations": [{"from": value, "value": value}], "split": value,
        **{name: {"dtype": kind, "_type": "Value"} for name, kind in META_COLUMNS.items()},
        "usage": {f: {"dtype": "int64", "_type": "Value"} for f in USAGE_FIELDS},
        EXTRA_COLUMN: value,
    }
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=metadata)


def _is_int(value: Any) -> bool:
    """An int that fits an int64 column (bools and huge ints go to `extra`)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def to_row(rec: dict[str, Any], split: str, image: Any) -> dict[str, Any]:
    """One Parquet row: typed columns where the values fit them, the rest verbatim in `extra` (JSON)."""
    extra: dict[str, Any] = {k: v for k, v in rec.items() if k not in ("id", "image", "conversations", "split", "meta")}
    sample_id = rec.get("id")
    row: dict[str, Any] = {
        "id": sample_id if isinstance(sample_id, str) or sample_id is None else str(sample_id),
        "image": image, "split": split,
    }
    if "id" in rec and not isinstance(sample_id, str):
        extra["id"] = sample_id  # an int id, say: kept exactly, the column holds its text
    if rec.get("split") is not None and not isinstance(rec["split"], str):
        extra["split"] = rec["split"]  # not a name; the column holds the split the export resolved
    if "image" in rec and not isinstance(rec["image"], str):
        extra["image"] = rec["image"]  # null (text-only, or a missing file kept) or not a path
    turns = rec.get("conversations")
    if isinstance(turns, list):
        row["conversations"] = [{"from": t["from"], "value": t["value"]} for t in turns]
        if any(set(t) != TURN_KEYS for t in turns):
            extra["conversations"] = turns  # turns with more keys than from/value
    elif "conversations" in rec:
        extra["conversations"] = turns
    meta = rec.get("meta")
    if "meta" in rec:
        if isinstance(meta, dict):
            rest = dict(meta)
            for name, kind in META_COLUMNS.items():
                value = rest.get(name)
                if (kind == "string" and isinstance(value, str)) or (kind == "int64" and _is_int(value)):
                    row[name] = rest.pop(name)
            usage = rest.get("usage")
            if isinstance(usage, dict) and set(usage) == set(USAGE_FIELDS) and all(_is_int(v) for v in usage.values()):
                row["usage"] = rest.pop("usage")
            if rest or not meta:
                extra["meta"] = rest
        else:
            extra["meta"] = meta
    row[EXTRA_COLUMN] = json.dumps(extra, ensure_ascii=False, sort_keys=True) if extra else None
    return row


def from_row(row: dict[str, Any], where: str = "a Parquet row") -> dict[str, Any]:
    """A sample record from a row (ours or any Parquet dataset with LLaVA's columns); inverse of to_row.

    where: the row's file and number, for the message when its extra column is not a JSON object.
    """
    rec: dict[str, Any] = {}
    extra = parse_json(row[EXTRA_COLUMN], where, hint="re-export the dataset") if isinstance(row.get(EXTRA_COLUMN), str) else {}
    if not isinstance(extra, dict):
        raise InputError(where, f"the {EXTRA_COLUMN} column holds a JSON {json_type(extra)}, not an object", "re-export the dataset")
    meta: dict[str, Any] = {}
    has_meta = False
    for key, value in row.items():
        if key == EXTRA_COLUMN:
            continue
        if key in META_COLUMNS or key == "usage":
            if value is not None:
                meta[key] = value
                has_meta = True
        elif key == "image" and isinstance(value, dict):
            rec["image"] = value.get("path")
        elif value is not None:
            rec[key] = value
    if "meta" in extra:
        extra_meta = extra.pop("meta")
        if not isinstance(extra_meta, dict):
            rec.update(extra)
            rec["meta"] = extra_meta
            return rec
        meta.update(extra_meta)
        has_meta = True
    rec.update(extra)
    if has_meta:
        rec["meta"] = meta
    return rec


# --- reading -----------------------------------------------------------------------------------


def card_header(folder: Path) -> dict[str, Any]:
    """The YAML header of folder/README.md ({} when there is none)."""
    card = folder / "README.md"
    if not card.is_file():
        return {}
    text = read_text(card, "dataset card")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        header = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError as exc:
        raise VisinstructError(f"{card}: the YAML header does not parse ({exc})", "fix or delete the card") from None
    return header if isinstance(header, dict) else {}


def data_files(folder: Path, config: str = "default") -> list[Path]:
    """The Parquet files of a dataset folder: the card's config if it names them, else every *.parquet."""
    for entry in card_header(folder).get("configs") or []:
        if isinstance(entry, dict) and entry.get("config_name") == config:
            specs = entry.get("data_files") or []
            patterns = [specs] if isinstance(specs, str) else [s["path"] if isinstance(s, dict) else s for s in specs]
            found: list[Path] = []
            for pattern in patterns:
                for p in [pattern] if isinstance(pattern, str) else pattern:
                    found.extend(sorted(folder.glob(p)))
            if found:
                return found
    return sorted(p for p in folder.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def hub_snapshot(repo: str) -> Path:
    """Download (or find in the cache) a Hub dataset's card and data files; the local folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise VisinstructError("huggingface_hub is not installed (needed for hf:// datasets)", INSTALL_HINT) from None
    repo_id, _, revision = repo.partition("@")
    try:
        # Endpoint and cache read now, not at huggingface_hub's import (HF_ENDPOINT may be set after it).
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision or None,
                                      allow_patterns=["README.md", "*.parquet", "*.json", "*.jsonl"],
                                      endpoint=os.environ.get("HF_ENDPOINT") or None,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except Exception as exc:  # network, auth and missing-repo errors all end the same way for the user
        raise VisinstructError(
            f"cannot get hf://{repo} from the Hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            "check the network and the dataset id; for a private dataset run `hf auth login` or set HF_TOKEN",
        ) from None


def local_folder(path: str | Path) -> Path:
    """The local folder of an HF input: itself, or the Hub snapshot of hf://org/name."""
    repo = hub_repo_id(path)
    return hub_snapshot(repo) if repo is not None else Path(path)


def image_cache_dir() -> Path:
    """Where embedded images are written for the trainer (inputs are never modified).

    `$VISINSTRUCT_IMAGE_CACHE`, else `$XDG_CACHE_HOME/visinstruct/hf-images` (~/.cache/...). Not under
    `$VISINSTRUCT_CACHE`: that names the response cache's SQLite file, not a folder.
    """
    folder = os.environ.get(IMAGE_CACHE_ENV)
    if folder:
        return Path(folder).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "visinstruct" / "hf-images"


def _extract_image(cell: dict[str, Any], into: Path) -> str | None:
    """Write an embedded image once (named by its content hash); its absolute path."""
    data = cell.get("bytes")
    if not data:
        return cell.get("path")
    suffix = Path(str(cell.get("path") or "")).suffix.lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,5}", suffix):
        suffix = ".img"
    target = into / (hashlib.sha256(data).hexdigest()[:32] + suffix)
    if not target.is_file():
        into.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return str(target.resolve())


@dataclass
class HfFiles:
    """The sample files of an HF input: Parquet shards, else (a Hub repo only) LLaVA JSON/JSONL files."""

    parquet: list[Path]
    json: list[Path]


def hf_files(path: str | Path) -> HfFiles:
    """The files to read for an exported folder or hf://org/name (downloading a Hub dataset first)."""
    folder = local_folder(path)
    parquet = data_files(folder)
    if parquet:
        return HfFiles(parquet, [])
    # A Hub dataset stored as LLaVA JSON/JSONL files (liuhaotian/LLaVA-Instruct-150K, say). Not for a
    # local folder: beside samples it holds rejects and run manifests, which are not training data.
    hub = hub_repo_id(path) is not None
    json_files = sorted(p for p in folder.rglob("*.json*") if p.suffix in (".json", ".jsonl")) if hub else []
    if not json_files:
        raise VisinstructError(f"{path} has no Parquet{' or JSON' if hub else ''} sample files",
                               "pass a folder made by `datagen export --format hf`, or a sample file")
    return HfFiles([], json_files)


def iter_parquet_records(files: list[Path], extract_images_to: Path | None = None,
                         batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """Sample records of Parquet shards, streamed a batch at a time.

    Without extract_images_to an embedded image's bytes are not even read (its stored path is the image);
    with it, each embedded image is written there once and the record names its absolute path (the trainer).
    """
    _, pq = pyarrow_modules()
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for a damaged file
            raise VisinstructError(f"{file} is not a readable Parquet file ({exc})", "re-export or re-download it") from None
        names = parquet.schema_arrow.names
        columns = None
        embedded = "image" in names and str(parquet.schema_arrow.field("image").type).startswith("struct")
        if embedded and extract_images_to is None:
            columns = [n for n in names if n != "image"] + ["image.path"]  # skip the image bytes
        number = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            for row in batch.to_pylist():
                if embedded and extract_images_to is not None and isinstance(row.get("image"), dict):
                    row["image"] = {"path": _extract_image(row["image"], extract_images_to)}
                yield from_row(row, f"{file} row {number}")
                number += 1
