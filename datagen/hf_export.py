"""`datagen export --format hf`: Parquet shards and the dataset card into one folder, then optionally the Hub."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.errors import VisinstructError
from datagen.hf_card import card_header, collect_provenance, render_card
from datagen.hf_dataset import HfExportOptions, HfExportReport, check_out_folder, replace_folder, write_hf_folder
from datagen.quality.io import ImageLookup
from datagen.quality.stats import compute_stats


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
    import json
    import shlex
    import sys

    import typer

    from datagen.quality.export import parse_mix
    from datagen.quality.gate import open_lookup

    options = HfExportOptions(
        embed_images=embed_images, image_root=image_root, images_dir=images_dir, keep_missing=keep_missing,
        split=split, mix=parse_mix(mix) if mix is not None else None, seed=seed, total=total,
    )
    if push_to_hub:
        from datagen.hf_push import check_push

        check_push(push_to_hub)  # a bad repo id or no token fails now, not after the export
    command = "datagen " + shlex.join(sys.argv[1:])
    result = export_hf(files, out, options, open_lookup(coco_root, coco_split), command=command, repo_id=push_to_hub)
    report = result.report
    summary = {**report.as_dict(), "folder": str(out)}
    if push_to_hub:
        from datagen.hf_push import push_folder

        summary["commit_url"] = push_folder(out, push_to_hub, private=private, endpoint=os.environ.get("HF_ENDPOINT"))
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
        return
    parts = ", ".join(f"{s} {n}/{report.available[s]}" for s, n in sorted(report.per_split.items()))
    typer.echo(f"{report.written} samples -> {out}/ ({parts}; {len(report.shards)} Parquet shard(s), card README.md)")
    notes = []
    if report.skipped_rejected:
        notes.append(f"{report.skipped_rejected} rejected samples skipped")
    if report.missing_images:
        notes.append(f"{report.missing_images} samples with missing images {'kept' if keep_missing else 'dropped'}")
    if notes:
        typer.echo("  " + "; ".join(notes))
    if push_to_hub:
        typer.echo(f"pushed to {push_to_hub}: {summary['commit_url']}")
