"""`datagen merge`: join the outputs of `--shard K/N` runs (the inputs are never modified)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datagen.cli.common import sample_files
from datagen.escaping import echo, terminal_text
from datagen.engine.shard import merge_shards


def merge(
    inputs: Annotated[list[Path], typer.Argument(help="Shard outputs, e.g. data/detail.shard-*-of-4.jsonl.")],
    out: Annotated[Path, typer.Option(help="Merged JSONL (rejects go beside it).")],
    allow_missing: Annotated[bool, typer.Option(
        help="Write the merge even if some shard or image is not done, or cannot be told done (no run manifest).")] = False,
) -> None:
    """Join shard outputs, checking that no id is doubled and no shard or image is missing."""
    # Each shard's rejects, manifest and failures are found beside it: given among the inputs (a glob), they are skipped.
    inputs = sample_files(list(inputs), rejects_readable=False)
    report = merge_shards(list(inputs), out, allow_missing=allow_missing)
    of = f" of {report.images_assigned}" if report.images_assigned is not None else " (images assigned: unknown)"
    # Shard labels and missing lines come from the shards' manifests: printed with control characters written out.
    echo(terminal_text(f"merged {len(inputs)} file(s), shards {', '.join(report.shards) or 'unknown'}: "
                       f"{report.images_done}{of} images done: {report.samples} samples -> {out}, "
                       f"{report.rejects} rejects"))
    for line in report.missing:
        echo(f"  missing: {terminal_text(line)}", err=True)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
