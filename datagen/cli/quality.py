"""`datagen check | stats | review | export`: quality tools for any LLaVA-format sample file."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from datagen.cli.common import sample_files
from datagen.cli.options import SAMPLE_SPLIT_HELP, SampleSplit
from datagen.errors import VisinstructError
from datagen.escaping import echo, terminal_markup, terminal_text
from datagen.hf_export import export_hf_command
from datagen.parse import PARSE_REASON_CODES
from datagen.quality.checks import REASON_CODES, REASON_DESCRIPTIONS, QualityChecker
from datagen.quality.config import load_config
from datagen.quality.export import export_samples, parse_mix
from datagen.quality.gate import check_file, open_lookup
from datagen.quality.review import page_terminal, review_items, write_html
from datagen.quality.stats import compute_stats

COCO_ROOT_HELP = "COCO folder in the official layout (annotations/, <split>/ images); enables the object checks."
CONFIG_HELP = "Quality thresholds as YAML or JSON (fields of QualityConfig; others keep their defaults)."
# Choice lists, so --help lists the codes and a misspelt one is refused: the checks' codes for --disable; for
# --reason also the parse failures a rejects file records, and 'any'.
CheckCode = Enum("CheckCode", {code: code for code in REASON_CODES}, type=str)
FlagCode = Enum("FlagCode", {code: code for code in dict.fromkeys(("any", *REASON_CODES, *PARSE_REASON_CODES))},
                type=str)


def _value(choice: Optional[Enum]) -> Optional[str]:
    return None if choice is None else choice.value


WITH_REJECTS_HELP = ("Also read rejects files among the inputs (by default they are skipped unless every input is one, "
                     "as in data/*.rejects.jsonl).")




class ExportFormat(str, Enum):
    """What `export` writes: LLaVA's JSON array, or a Hugging Face dataset folder."""

    json = "json"
    hf = "hf"


def _config(
    config: Optional[Path], near_dup_threshold: Optional[float] = None, max_hallucinated: Optional[int] = None,
    disable: Optional[list[CheckCode]] = None, allow_trailing_image: bool = False,
):
    """The quality config: defaults, then the file, then flags."""
    base = load_config(config)
    return base.with_overrides(
        near_duplicate_threshold=near_dup_threshold,
        max_hallucinated_objects=max_hallucinated,
        disabled_checks=sorted(set(base.disabled_checks) | {c.value for c in disable}) if disable else None,
        image_token_position="start_or_end" if allow_trailing_image else None,
    )


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _console() -> Console:
    """Rich output; wide enough for the tables when piped (rich assumes 80 columns then)."""
    console = Console()
    return console if console.is_terminal else Console(width=140)


def check(
    in_file: Path = typer.Argument(..., metavar="IN", help="LLaVA-format samples: JSONL, a JSON array, an `export --format hf` folder or hf://org/name."),
    coco_root: Optional[Path] = typer.Option(None, help=COCO_ROOT_HELP),
    coco_split: str = typer.Option("val2017", help="COCO split the images belong to, e.g. val2017, train2017."),
    out_accepted: Optional[Path] = typer.Option(None, help="Write accepted samples here, unchanged (.json = array)."),
    out_rejected: Optional[Path] = typer.Option(None, help="Write rejected samples here with reject_reasons."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    split: Optional[SampleSplit] = typer.Option(None, help=SAMPLE_SPLIT_HELP),
    near_dup_threshold: Optional[float] = typer.Option(None, min=0.01, max=1.0, help="Override near_duplicate_threshold."),
    max_hallucinated: Optional[int] = typer.Option(None, min=0, help="Override max_hallucinated_objects."),
    disable: Optional[list[CheckCode]] = typer.Option(
        None, metavar="CODE", help="Reason code to skip (repeatable): " + ", ".join(c.value for c in CheckCode)
        + ". The table `check` prints says what each one checks."),
    allow_trailing_image: bool = typer.Option(False, help="Accept <image> at the end of the first turn too (LLaVA's files)."),
    with_rejects: bool = typer.Option(False, help=WITH_REJECTS_HELP),
) -> None:
    """Check every sample; write accepted and rejected files; print counts per reject reason."""
    in_file = sample_files([in_file], with_rejects)[0]
    cfg = _config(config, near_dup_threshold, max_hallucinated, disable, allow_trailing_image)
    lookup = open_lookup(coco_root, coco_split)
    summary = check_file(in_file, out_accepted, out_rejected, cfg, lookup, split=_value(split))
    if json_output:
        echo(json.dumps(summary.as_dict(), indent=2))
        return
    console = _console()
    table = Table(title=f"datagen check {terminal_markup(in_file)}", title_justify="left")
    table.add_column("reason")
    table.add_column("samples", justify="right")
    table.add_column("what it checks", style="dim")
    for code in REASON_CODES:
        if code in cfg.disabled_checks:
            continue
        table.add_row(code, str(summary.reasons.get(code, 0)), REASON_DESCRIPTIONS[code])
    console.print(table)
    share = f" ({100 * summary.accepted / summary.total:.1f}%)" if summary.total else ""
    console.print(f"{summary.total} samples: {summary.accepted} accepted{share}, {summary.rejected} rejected")
    if lookup is None:
        console.print("object check (hallucinated_object, CHAIR) skipped: no --coco-root given")
    else:
        chair = summary.chair
        console.print(f"CHAIR_i {_fmt(chair.chair_i)} ({chair.hallucinated}/{chair.mentioned} objects), "
                      f"CHAIR_s {_fmt(chair.chair_s)} ({chair.samples_hallucinating}/{chair.samples} samples)")
        if summary.images_not_in_coco:
            console.print(f"{summary.images_not_in_coco} samples name images not in COCO {terminal_markup(coco_split)}: "
                          "object check skipped for them")
    for label, path in (("accepted", out_accepted), ("rejected", out_rejected)):
        if path:
            console.print(f"  {label}: {terminal_markup(path)}")


def stats(
    files: list[Path] = typer.Argument(..., help="LLaVA-format sample files (JSONL or JSON arrays), HF dataset folders or hf://org/name."),
    coco_root: Optional[Path] = typer.Option(None, help=COCO_ROOT_HELP + " Needed for CHAIR."),
    coco_split: str = typer.Option("val2017", help="COCO split the images belong to."),
    split: Optional[SampleSplit] = typer.Option(None, help=SAMPLE_SPLIT_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP + " Here: count_hedged_mentions (for CHAIR)."),
    with_rejects: bool = typer.Option(False, help=WITH_REJECTS_HELP),
) -> None:
    """Per split: samples, turns, question/answer lengths, question types, objects, CHAIR, reject reasons."""
    files = sample_files(files, with_rejects)
    cfg = _config(config)
    result = compute_stats(files, open_lookup(coco_root, coco_split), split=_value(split),
                           count_hedged=cfg.count_hedged_mentions)
    if json_output:
        echo(json.dumps(result, indent=2))
        return
    names = list(result)
    # Split names, question words and stored reasons come from the samples: every cell is escaped.
    table = Table(title="datagen stats " + terminal_markup(" ".join(str(f) for f in files)), title_justify="left")
    table.add_column("")
    for name in names:
        table.add_column(terminal_markup(name), justify="right")

    def row(label: str, get) -> None:
        table.add_row(label, *[terminal_markup(get(result[name])) for name in names])

    row("samples", lambda s: str(s["samples"]))
    row("turns / sample (mean)", lambda s: _fmt(s["turns_per_sample"]["mean"], 2))
    for kind in ("question", "answer"):
        d = f"{kind}_words"
        row(f"{kind} words mean / p50 / p95",
            lambda s, d=d: f"{_fmt(s[d]['mean'], 1)} / {s[d]['p50']:g} / {s[d]['p95']:g}")
    row("question types", lambda s: ", ".join(f"{w} {v:.0%}" for w, v in list(s["question_types"].items())[:5]) or "-")
    row("objects mentioned", lambda s: str(s["objects_mentioned"]))
    row("top objects", lambda s: ", ".join(f"{k} {v}" for k, v in list(s["top_objects"].items())[:5]) or "-")
    row("CHAIR_i", lambda s: _fmt(s["chair_i"]))
    row("CHAIR_s", lambda s: _fmt(s["chair_s"]))
    row("rejected", lambda s: str(s["rejected"]))
    row("reject reasons", lambda s: ", ".join(f"{k} {v}" for k, v in s["reject_reasons"].items()) or "-")
    console = _console()
    console.print(table)
    if coco_root is None:
        console.print("CHAIR needs --coco-root (the image's boxes and captions)", style="dim")


def review(
    files: list[Path] = typer.Argument(..., help="LLaVA-format sample files (accepted or rejects files, HF dataset folders or hf://org/name)."),
    coco_root: Optional[Path] = typer.Option(None, help=COCO_ROOT_HELP + " Needed for images, boxes and context."),
    coco_split: str = typer.Option("val2017", help="COCO split the images belong to."),
    html: Optional[Path] = typer.Option(None, help="Write a static review page here instead of paging in the terminal."),
    embed_images: bool = typer.Option(False, help="HTML: embed downscaled images (one portable file, larger)."),
    split: Optional[SampleSplit] = typer.Option(None, help="Only samples of this split."),
    reason: Optional[FlagCode] = typer.Option(
        None, metavar="CODE", help="Only samples flagged with this reason code, found now or stored in a rejects "
        "file: " + ", ".join(c.value for c in FlagCode) + " (any = flagged at all)."),
    start: int = typer.Option(1, min=1, help="First sample to show (1-based, after filters)."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most this many samples."),
    config: Optional[Path] = typer.Option(None, help=CONFIG_HELP),
    title: Optional[str] = typer.Option(None, help="HTML page title (default: the file name)."),
    with_rejects: bool = typer.Option(False, help=WITH_REJECTS_HELP),
) -> None:
    """Read samples beside their context and check results: a terminal pager, or one HTML page with images and boxes."""
    files = sample_files(files, with_rejects)
    cfg = _config(config)
    lookup = open_lookup(coco_root, coco_split)
    wanted_split, wanted_reason = _value(split), _value(reason)
    items = []
    checker = QualityChecker(cfg)  # one for all files: near-duplicates across them are flagged, as `check` would
    for file in files:
        for item in review_items(file, lookup, cfg, checker=checker):
            if wanted_split and item.split != wanted_split:
                continue
            if wanted_reason and not (item.flags if wanted_reason == "any" else wanted_reason in item.flags):
                continue
            items.append(item)
    items = items[start - 1 :]
    if limit is not None:
        items = items[:limit]
    if html is not None:
        if lookup is None:
            echo("note: no --coco-root: the page shows samples without images and boxes", err=True)
        default_title = files[0].name if len(files) == 1 else f"{files[0].name} and {len(files) - 1} more"
        count = write_html(items, html, lookup, embed_images, title or default_title)
        echo(f"{count} samples -> {html}")
        return
    console = _console()
    page_terminal(items, console, interactive=sys.stdin.isatty() and console.is_terminal)


def export(
    files: list[Path] = typer.Argument(..., help="Accepted sample files (JSONL or JSON arrays, HF dataset folders or hf://org/name), any splits."),
    out: Path = typer.Option(..., help="Output for LLaVA's trainer (--data_path): .json a JSON array, other names JSONL; "
                             "with --format hf, a folder."),
    mix: Optional[str] = typer.Option(
        None, help="split=weight,...; default LLaVA-Instruct-158K's 58:23:77 conversation:detail:reasoning "
        "(--format hf: all samples); 'none' keeps all."
    ),
    seed: int = typer.Option(0, help="Seed for sampling and shuffling."),
    total: Optional[int] = typer.Option(None, min=1, help="At most this many samples."),
    image_folder: Optional[Path] = typer.Option(None, help="The folder the trainer gets as --image_folder; image paths become relative to it."),
    images_dir: Optional[Path] = typer.Option(None, help="Where the samples' image names resolve now (default: --image-folder), e.g. COCO/val2017."),
    keep_missing: bool = typer.Option(False, help="Keep samples whose image file is missing (dropped by default)."),
    keep_meta: bool = typer.Option(False, help="Keep split/meta keys (default: only id, image, conversations)."),
    split: Optional[SampleSplit] = typer.Option(None, help=SAMPLE_SPLIT_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print the export report as JSON."),
    output_format: ExportFormat = typer.Option(ExportFormat.json, "--format", help="json: LLaVA's JSON array; hf: a Hugging Face dataset "
                                      "folder (Parquet shards + dataset card), whatever --out's extension."),
    embed_images: bool = typer.Option(False, help="hf: store the image files in the Parquet (an Image feature)."),
    image_root: Optional[Path] = typer.Option(None, help="hf: image paths are written relative to this folder (and read from it)."),
    push_to_hub: Optional[str] = typer.Option(None, metavar="REPO_ID", help="hf: then push the folder to this Hub dataset repo (token: HF_TOKEN or `hf auth login`)."),
    private: bool = typer.Option(False, help="hf: create the Hub repo as private."),
    coco_root: Optional[Path] = typer.Option(None, help="hf: COCO folder, for CHAIR in the dataset card."),
    coco_split: str = typer.Option("val2017", help="hf: COCO split the images belong to."),
    with_rejects: bool = typer.Option(False, help=WITH_REJECTS_HELP + " Their rejected samples are still not exported."),
) -> None:
    """Mix splits in set proportions, shuffle deterministically, make ids unique; write LLaVA's JSON array (.json), JSONL or --format hf."""
    files = sample_files(files, with_rejects)
    if output_format is ExportFormat.hf:
        export_hf_command(files, out, mix, seed, total, image_root, images_dir, keep_missing, _value(split), embed_images,
                          push_to_hub, private, coco_root, coco_split, json_output)
        return
    hf_only = [flag for flag, given in (("--embed-images", embed_images), ("--image-root", image_root),
                                         ("--push-to-hub", push_to_hub), ("--private", private),
                                         ("--coco-root", coco_root)) if given]
    if hf_only:
        raise VisinstructError(f"{', '.join(hf_only)} is not for JSON output",
                               "--embed-images, --image-root, --push-to-hub, --private and --coco-root need --format hf")
    report = export_samples(
        files, out, parse_mix(mix), seed=seed, total=total, image_folder=image_folder, images_dir=images_dir,
        keep_missing=keep_missing, keep_meta=keep_meta, split=_value(split),
    )
    if json_output:
        echo(json.dumps(report.as_dict(), indent=2))
        return
    parts = ", ".join(f"{s} {n}/{report.available[s]}" for s, n in sorted(report.per_split.items()))
    echo(f"{report.written} samples -> {out} ({terminal_text(parts)})")  # split names come from the samples
    notes = []
    if report.skipped_rejected:
        notes.append(f"{report.skipped_rejected} rejected samples skipped")
    if report.missing_images:
        notes.append(f"{report.missing_images} samples with missing images {'kept' if keep_missing else 'dropped'}")
    if report.bad_image_paths:
        notes.append(f"{report.bad_image_paths} samples with a bad image path dropped (see `datagen check`)")
    if report.duplicate_ids:
        notes.append(f"{report.duplicate_ids} second copies of a sample (same split and id) dropped")
    if report.renamed_ids:
        notes.append(f"{report.renamed_ids} ids made unique")
    if notes:
        echo("  " + "; ".join(notes))


def register(app: typer.Typer) -> None:
    """Attach the quality commands (check, stats, review, export) to the `datagen` app."""
    app.command()(check)
    app.command()(stats)
    app.command()(review)
    app.command()(export)
