"""`datagen coco fetch`, `coco index`, `render` and `captions`: get COCO, index it, show a context, write stage-1 pairs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.captions import write_caption_pairs
from datagen.cli.options import AbsentObjectsOpt, CocoRootOpt, CocoSplitOpt, CooccurrenceFromOpt, LimitOpt, PromptsDirOpt
from datagen.coco import CocoIndex, annotation_path, build_planned_index, open_index, plan_index
from datagen.context import DEFAULT_ABSENT_OBJECTS, context_builder
from datagen.errors import VisinstructError
from datagen.escaping import echo
from datagen.fetch import fetch_coco
from datagen.run_config import Split
from datagen.task import LlavaTask
from datagen.urls import check_base_url

coco_app = typer.Typer(help="Get COCO annotations and images.", no_args_is_help=True)


FETCH_SPLITS = ("val2017", "train2017", "val2014", "train2014")


@coco_app.command("fetch")
def coco_fetch(
    coco_split: Annotated[str, typer.Option(help=f"COCO split to fetch: {', '.join(FETCH_SPLITS)}.")] = "val2017",
    images: Annotated[int, typer.Option(min=0, help="Download the first N images of the split (by id).")] = 50,
    to: Annotated[Path, typer.Option(help="Destination COCO root.")] = Path("data/coco"),
    base_url: Annotated[str, typer.Option(help="Mirror of the official COCO site.")] = "http://images.cocodataset.org",
    verify: Annotated[bool, typer.Option(
        help="Decode every image and compare it with the width and height its annotation gives (a bad one is "
             "fetched again). COCO publishes no checksums: without this, downloads are still checked against the "
             "size the server announced and the annotation archive's CRCs.")] = True,
    old_split: Annotated[Optional[str], typer.Option(
        "--split", hidden=True, help="Old name of --coco-split (--split means the kind of sample everywhere else).")] = None,
) -> None:
    """Download COCO annotations and the first N images of a split (resumable)."""
    if old_split is not None:
        echo("warning: `coco fetch --split` is now `--coco-split` (--split names the kind of sample in every "
             "other command); the old name still works for now", err=True)
        coco_split = old_split
    root = fetch_coco(split=coco_split, images=images, dest=to, base_url=check_base_url(base_url), verify=verify)
    echo(f"COCO {coco_split}: annotations and {images} images in {root}")


@coco_app.command("index")
def coco_index(
    coco_root: CocoRootOpt,
    coco_split: CocoSplitOpt = "val2017",
    captions_only: Annotated[bool, typer.Option(
        "--captions-only", help="Index the captions alone (enough for conversation and captions; no boxes).")] = False,
) -> None:
    """Build the split's compact index now (or report that it is up to date), e.g. before a Ray job.

    The index goes to $VISINSTRUCT_INDEX_DIR (default ~/.cache/visinstruct/coco-index), where every later
    command and worker finds it. With an instances file it holds boxes too, and serves every split.
    """
    if not coco_root.is_dir():
        raise VisinstructError(f"COCO root not found: {coco_root}", "pass --coco-root DIR or fetch data with `datagen coco fetch`")
    with_instances = not captions_only and annotation_path(coco_root, "instances", coco_split).is_file()
    plan = plan_index(coco_root, coco_split, with_instances)
    started = time.perf_counter()
    if plan.fresh:
        status = "up to date"
    else:
        build_planned_index(plan)
        status = f"built in {time.perf_counter() - started:.1f}s"
    index = open_index(plan.path)
    what = "captions and boxes" if index.with_instances else "captions only"
    echo(f"{coco_split}: index {status}: {plan.path} ({plan.path.stat().st_size / 1e6:.1f} MB; "
         f"{len(index.image_ids()):,} captioned images, {what})")


def render(
    coco_root: CocoRootOpt,
    image_id: Annotated[int, typer.Option(help="COCO image id.")],
    coco_split: Annotated[str, typer.Option(help="Annotation split, e.g. val2017, train2017, train2014.")] = "val2017",
    split: Annotated[Split, typer.Option(help="Which split's context form (conversation omits boxes).")] = Split.detail,
    seed: Annotated[int, typer.Option(help="Seed (negative: breaks ties in the absent-object choice).")] = 0,
    cooccurrence_from: CooccurrenceFromOpt = None,
    absent_objects: AbsentObjectsOpt = DEFAULT_ABSENT_OBJECTS,
) -> None:
    """Print the symbolic context the LLM sees for one image, and nothing else."""
    index = CocoIndex(coco_root, coco_split, with_instances=LlavaTask.needs_boxes(split.value))
    builder = context_builder(split.value, index, cooccurrence_from, seed, absent_objects)
    echo(builder.render(index.record(image_id))[0])  # captions are input text: echo shows controls, keeps line breaks


def captions(
    coco_root: CocoRootOpt,
    coco_split: Annotated[str, typer.Option(help="Annotation split.")] = "val2017",
    out: Annotated[Path, typer.Option(help="Output JSONL of stage-1 pairs (overwritten).")] = Path("data/captions.jsonl"),
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for caption and instruction choice.")] = 0,
    all_captions: Annotated[bool, typer.Option(help="One pair per caption instead of one per image.")] = False,
    prompts_dir: PromptsDirOpt = None,
) -> None:
    """Write stage-1 alignment pairs: a brief-description instruction + <image>, answered by a COCO caption."""
    count = write_caption_pairs(coco_root, coco_split, out, limit=limit, seed=seed, all_captions=all_captions,
                                prompts_dir=prompts_dir)
    echo(f"{count} caption pairs -> {out}")


def register(app: typer.Typer) -> None:
    app.command()(render)
    app.add_typer(coco_app, name="coco")
    app.command()(captions)
