"""`datagen export --format hf`: Parquet shards and the dataset card into one folder, then optionally the Hub."""
from __future__ import annotations

import json
import logging
import os
import random
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from datagen.errors import VisinstructError
from datagen.escaping import echo
from datagen.hf_card import card_header, collect_provenance, render_card
from datagen.hf_dataset import (
    DATA_FOLDER, EXTRA_COLUMN, HF_SPLIT, SAFE_SPLIT, HfExportOptions, HfExportReport, pyarrow_modules, arrow_schema, to_row,
)
from datagen.hf_push import check_push, push_folder
from datagen.quality.export import FirstCopies, image_is_safe, parse_mix, plan_counts, relative_image
from datagen.quality.gate import open_lookup
from datagen.quality.io import ImageLookup
from datagen.quality.stats import compute_stats
from datagen.sample import read_samples, sample_split, split_from_filename

log = logging.getLogger(__name__)


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
        pa, pq = pyarrow_modules()
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
    image_root = options.image_root
    base = options.images_dir or image_root
    copies = FirstCopies()
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
            if not copies.first(name, rec):
                report.duplicate_ids += 1
                continue
            if not image_is_safe(rec, base):
                report.bad_image_paths += 1  # never written, and with --embed-images never read
                continue
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


@dataclass
class HfExportResult:
    """The report of the export, the card's header (figures), and the folder written."""

    report: HfExportReport
    header: dict[str, Any]
    folder: Path


def export_hf(paths: list[Path], out: Path, options: HfExportOptions, lookup: ImageLookup | None = None,
              command: str = "datagen export", repo_id: str | None = None) -> HfExportResult:
    """Write shards and card into a temporary folder beside `out`, then move it into place (all or nothing)."""
    out = Path(out)
    check_out_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        report = write_hf_folder(paths, partial, options)
        if not report.written:
            raise VisinstructError("no accepted samples to export", "pass files with accepted samples (rejects are skipped)")
        # The card's figures are those of `datagen stats` on the folder itself (and on the rejects files).
        stats = compute_stats([partial], lookup)
        prov = collect_provenance(paths)
        rejected = compute_stats(prov.rejects_files, None) if prov.rejects_files else None
        name = repo_id.split("/")[-1] if repo_id else out.resolve().name
        header = card_header(report, stats, prov, rejected, options.embed_images, command, name)
        card = render_card(header, options.embed_images, repo_id or str(out))
        (partial / "README.md").write_text(card, encoding="utf-8")
        replace_folder(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return HfExportResult(report, header, out)


def export_hf_command(
    files: list[Path], out: Path, mix: str | None, seed: int, total: int | None, image_root: Path | None,
    images_dir: Path | None, keep_missing: bool, split: str | None, embed_images: bool, push_to_hub: str | None,
    private: bool, coco_root: Path | None, coco_split: str, json_output: bool,
) -> None:
    """The CLI's `export --format hf`: export, print what was written, push when asked."""
    options = HfExportOptions(
        embed_images=embed_images, image_root=image_root, images_dir=images_dir, keep_missing=keep_missing,
        split=split, mix=parse_mix(mix) if mix is not None else None, seed=seed, total=total,
    )
    if push_to_hub:
        check_push(push_to_hub)  # a bad repo id or no token fails now, not after the export
    command = "datagen " + shlex.join(sys.argv[1:])
    result = export_hf(files, out, options, open_lookup(coco_root, coco_split), command=command, repo_id=push_to_hub)
    report = result.report
    summary = {**report.as_dict(), "folder": str(out)}
    if push_to_hub:
        summary["commit_url"] = push_folder(out, push_to_hub, private=private, endpoint=os.environ.get("HF_ENDPOINT"))
    if json_output:
        echo(json.dumps(summary, indent=2))
        return
    parts = ", ".join(f"{s} {n}/{report.available[s]}" for s, n in sorted(report.per_split.items()))
    echo(f"{report.written} samples -> {out}/ ({parts}; {len(report.shards)} Parquet shard(s), card README.md)")
    notes = []
    if report.skipped_rejected:
        notes.append(f"{report.skipped_rejected} rejected samples skipped")
    if report.missing_images:
        notes.append(f"{report.missing_images} samples with missing images {'kept' if keep_missing else 'dropped'}")
    if report.bad_image_paths:
        notes.append(f"{report.bad_image_paths} samples with a bad image path dropped (see `datagen check`)")
    if report.duplicate_ids:
        notes.append(f"{report.duplicate_ids} second copies of a sample (same split and id) dropped")
    if notes:
        echo("  " + "; ".join(notes))
    if push_to_hub:
        echo(f"pushed to {push_to_hub}: {summary['commit_url']}")
