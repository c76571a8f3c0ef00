"""Hugging Face datasets in and out: streaming Parquet export, and reading an exported folder or hf://org/name."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.errors import VisinstructError

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
DATA_FOLDER = "data"
HF_SPLIT = "train"  # the one Hugging Face split; ours (conversation, detail, ...) are a column and configs
EXTRA_COLUMN = "extra"
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
    shards: list[str] = field(default_factory=list)
    bytes_written: int = 0  # row data before compression (the card's num_bytes)
    file_bytes: int = 0  # Parquet files on disk (the card's download_size)
    writer_models: Counter = field(default_factory=Counter)  # model -> samples written
    prompt_hashes: dict[str, set[str]] = field(default_factory=dict)  # split -> prompt hashes of its samples

    def as_dict(self) -> dict[str, Any]:
        return {
            "written": self.written, "per_split": dict(sorted(self.per_split.items())),
            "available": dict(sorted(self.available.items())), "skipped_rejected": self.skipped_rejected,
            "missing_images": self.missing_images, "shards": self.shards, "bytes_written": self.bytes_written,
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


# --- export ------------------------------------------------------------------------------------


def _pyarrow():
    """pyarrow and pyarrow.parquet, imported on use: an optional dependency (the hf extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise VisinstructError("pyarrow is not installed (needed for Hugging Face datasets)", INSTALL_HINT) from None
    return pa, pq


def arrow_schema(embed_images: bool):
    """The Parquet schema, with the `huggingface` features metadata that `datasets` reads."""
    pa, _ = _pyarrow()
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


def from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A sample record from a row (ours or any Parquet dataset with LLaVA's columns); inverse of to_row."""
    rec: dict[str, Any] = {}
    extra = json.loads(row[EXTRA_COLUMN]) if isinstance(row.get(EXTRA_COLUMN), str) else {}
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


class ShardWriter:
    """Writes rows of one split as Parquet shards (data/<split>/train-NNNNN.parquet), a row group at a time."""

    def __init__(self, folder: Path, schema: Any, options: HfExportOptions) -> None:
        self.folder = folder
        self.schema = schema
        self.options = options
        self.files: list[Path] = []
        self._writer: Any = None
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0
        self._file_bytes = 0
        self.total_bytes = 0

    def write(self, row: dict[str, Any], size: int) -> None:
        self._rows.append(row)
        self._buffered += size
        if len(self._rows) >= self.options.rows_per_group or self._buffered >= self.options.group_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        pa, pq = _pyarrow()
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{HF_SPLIT}-{len(self.files):05d}.parquet"
            self.files.append(path)
            self._writer = pq.ParquetWriter(path, self.schema)
            self._file_bytes = 0
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
        self._file_bytes += self._buffered
        self.total_bytes += self._buffered
        self._rows, self._buffered = [], 0
        if self._file_bytes >= self.options.shard_bytes:
            self._writer.close()
            self._writer = None

    def close(self) -> list[Path]:
        """Flush, close, and rename the shards to the Hub's train-00000-of-00003.parquet form."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        final = []
        for k, path in enumerate(self.files):
            target = path.with_name(f"{HF_SPLIT}-{k:05d}-of-{len(self.files):05d}.parquet")
            path.rename(target)
            final.append(target)
        return final


def check_split_name(name: str) -> str:
    """A split name that can name a folder and a config (it comes from the data, so it is untrusted)."""
    if not SAFE_SPLIT.match(name) or name == "default":
        raise VisinstructError(
            f"split name {name!r} cannot name a dataset config",
            "use letters, digits, - and _ (not 'default'), or pass --split",
        )
    return name


def _accepted(paths: list[Path], options: HfExportOptions, report: HfExportReport) -> Iterator[tuple[str, dict[str, Any]]]:
    """(split, record) of every accepted sample of the files, streamed, with missing images left out."""
    # Imported here: datagen.quality.io imports this module (its hook for folders and hf://).
    from datagen.quality.export import relative_image
    from datagen.quality.io import read_samples, sample_split, split_from_filename

    image_root = options.image_root
    base = options.images_dir or image_root
    for path in paths:
        fallback = options.split or split_from_filename(path)
        for rec in read_samples(path):
            if rec.get("reject_reasons"):
                report.skipped_rejected += 1
                continue
            name = options.split or sample_split(rec, fallback)
            if name is None:
                raise VisinstructError(
                    f"cannot tell the split of the samples in {path}",
                    'add a "split" field, name the file after its split (detail.jsonl), or pass --split',
                )
            image = rec.get("image")
            if base is not None and isinstance(image, str) and image:
                if not (base / image).is_file():
                    report.missing_images += 1
                    if not options.keep_missing:
                        continue
                    rec = {**rec, "image": None}
                elif image_root is not None:
                    rec = {**rec, "image": relative_image(image, base, image_root)}
            yield check_split_name(name), rec


def _image_cell(rec: dict[str, Any], options: HfExportOptions) -> tuple[Any, int]:
    """The image column's value and its size in bytes (for row-group sizing)."""
    image = rec.get("image")
    if not isinstance(image, str):
        return None, 0
    if not options.embed_images:
        return image, len(image)
    root = options.image_root or options.images_dir
    data = (Path(root) / image).read_bytes()  # the file as it is: decoding gives the original pixels
    return {"bytes": data, "path": image}, len(data)


def _pick(paths: list[Path], options: HfExportOptions) -> dict[str, set[int]] | None:
    """With a mix or a total: which accepted samples of each split to keep (a counting pass, no records held)."""
    from datagen.quality.export import plan_counts  # here for the same reason as in _accepted

    if options.mix is None and options.total is None:
        return None
    available: Counter = Counter(name for name, _ in _accepted(paths, options, HfExportReport()))
    counts = plan_counts(dict(available), options.mix, options.total)
    # Seeded per split like the JSON export, so both formats pick the same samples.
    return {name: set(random.Random(f"{options.seed}:{name}").sample(range(available[name]), n))
            for name, n in counts.items()}


def write_hf_folder(paths: list[Path], folder: Path, options: HfExportOptions) -> HfExportReport:
    """Stream accepted samples into Parquet shards under folder/data/<split>/; returns what was written."""
    if options.embed_images and options.image_root is None and options.images_dir is None:
        raise VisinstructError("--embed-images needs to know where the images are", "pass --image-root (e.g. COCO/val2017)")
    report = HfExportReport()
    picked = _pick(paths, options)
    schema = arrow_schema(options.embed_images)
    writers: dict[str, ShardWriter] = {}
    seen: Counter = Counter()
    for name, rec in _accepted(paths, options, report):
        index = seen[name]
        seen[name] += 1
        if picked is not None and index not in picked.get(name, ()):
            continue
        image, size = _image_cell(rec, options)
        row = to_row(rec, name, image)
        size += sum(len(t["value"]) for t in row["conversations"]) + len(row[EXTRA_COLUMN] or "")
        if name not in writers:
            writers[name] = ShardWriter(folder / DATA_FOLDER / name, schema, options)
        writers[name].write(row, size)
        report.per_split[name] += 1
        if row.get("model"):
            report.writer_models[row["model"]] += 1
        if row.get("prompt_hash"):
            report.prompt_hashes.setdefault(name, set()).add(row["prompt_hash"])
    report.available.update(seen)
    for name in sorted(writers):
        files = writers[name].close()
        report.shards.extend(p.relative_to(folder).as_posix() for p in files)
        report.file_bytes += sum(p.stat().st_size for p in files)
        report.bytes_written += writers[name].total_bytes
    report.written = sum(report.per_split.values())
    if report.missing_images:
        log.warning("%d samples name images not found under %s%s", report.missing_images,
                    options.images_dir or options.image_root, " (kept without image)" if options.keep_missing else " (dropped)")
    return report


def replace_folder(partial: Path, out: Path) -> None:
    """Move the finished export into place; an earlier export there is replaced, anything else refused."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        partial.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)  # put the earlier export back
        raise
    if old is not None:
        shutil.rmtree(old)


def check_out_folder(out: Path) -> None:
    """Refuse to overwrite a folder that is not an earlier export (never lose the user's files)."""
    if out.exists() and not out.is_dir():
        raise VisinstructError(f"{out} exists and is not a folder", "pass a folder path for --format hf")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / "README.md").is_file() and (out / DATA_FOLDER).is_dir()
        if not ours or any(p.name not in ("README.md", DATA_FOLDER, ".gitattributes") for p in out.iterdir()):
            raise VisinstructError(f"{out} exists and is not an earlier export", "pass a new or empty folder as --out")


# --- reading -----------------------------------------------------------------------------------


def card_header(folder: Path) -> dict[str, Any]:
    """The YAML header of folder/README.md ({} when there is none)."""
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        return {}
    text = card.read_text(encoding="utf-8")
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
    """Where embedded images are written for the trainer (inputs are never modified)."""
    base = os.environ.get("VISINSTRUCT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "visinstruct")
    return Path(base).expanduser() / "hf-images"


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


def iter_hf_records(path: str | Path, extract_images_to: Path | None = None, batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """Sample records of an exported folder or hf://org/name, streamed a batch at a time.

    Without extract_images_to an embedded image's bytes are not even read (its stored path is the image);
    with it, each embedded image is written there once and the record names its absolute path (the trainer).
    """
    folder = local_folder(path)
    files = data_files(folder)
    if not files:
        from datagen.quality.io import read_samples, split_from_filename  # see _accepted

        # A Hub dataset stored as LLaVA JSON/JSONL files (liuhaotian/LLaVA-Instruct-150K, say). Not for a
        # local folder: beside samples it holds rejects and run manifests, which are not training data.
        hub = hub_repo_id(path) is not None
        json_files = sorted(p for p in folder.rglob("*.json*") if p.suffix in (".json", ".jsonl")) if hub else []
        if not json_files:
            raise VisinstructError(f"{path} has no Parquet{' or JSON' if hub else ''} sample files",
                                   "pass a folder made by `datagen export --format hf`, or a sample file")
        for json_file in json_files:
            split = split_from_filename(json_file)  # conversation_58k.json -> conversation
            for rec in read_samples(json_file):
                yield {**rec, "split": rec["split"]} if "split" in rec or split is None else {**rec, "split": split}
        return
    _, pq = _pyarrow()
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
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            for row in batch.to_pylist():
                if embedded and extract_images_to is not None and isinstance(row.get("image"), dict):
                    row["image"] = {"path": _extract_image(row["image"], extract_images_to)}
                yield from_row(row)
