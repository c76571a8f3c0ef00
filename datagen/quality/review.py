"""Reviewing samples beside their image: a terminal pager and a static HTML page."""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from datagen.coco import ImageRecord
from datagen.escaping import terminal_text
from datagen.context import absent_from_context, render_context
from datagen.prompts import SPLITS_WITH_BOXES
from datagen.outputs import require_file_target, write_text_atomic
from datagen.quality.checks import REASON_DESCRIPTIONS, QualityChecker, SampleReport, SampleView
from datagen.quality.config import QualityConfig
from datagen.quality.grounding import named_category, parse_boxes
from datagen.quality.objects import default_matcher
from datagen.quality.io import ImageLookup
from datagen.sample import read_samples, sample_split, split_from_filename
from datagen.quality.review_page import render_page

THUMBNAIL_SIDE = 512


@dataclass
class ReviewItem:
    """One sample with everything a reviewer looks at."""

    index: int
    rec: dict[str, Any]
    split: str
    context: str | None
    report: SampleReport
    record: ImageRecord | None

    @property
    def stored_reasons(self) -> list[str]:
        reasons = self.rec.get("reject_reasons")
        return [str(r) for r in reasons] if isinstance(reasons, list) else []

    @property
    def absent_objects(self) -> list[str]:
        """The absent objects a negative sample's writer was given (meta, else the stored context)."""
        meta = self.rec.get("meta")
        listed = meta.get("absent_objects") if isinstance(meta, dict) else None
        if isinstance(listed, list):
            return [str(v) for v in listed]
        return absent_from_context(self.context) if self.context else []

    @property
    def text_boxes(self) -> list[tuple[str, tuple[float, float, float, float]]]:
        """Every well-formed box the turns mention, with the object named before it ("" for a bare region)."""
        found = []
        for turn in self.rec.get("conversations", []):
            value = str(turn.get("value", ""))
            previous_end = 0
            for tb in parse_boxes(value):
                before, previous_end = value[previous_end:tb.start], tb.end
                if tb.box is not None:
                    found.append((named_category(before, default_matcher()) or "", tb.box))
        return found

    @property
    def flags(self) -> list[str]:
        """Reasons found now plus any stored with the sample (a rejects file), without repeats."""
        return list(dict.fromkeys(self.report.reasons + self.stored_reasons))


def review_items(
    path: Path, lookup: ImageLookup | None, config: QualityConfig, split: str | None = None,
    checker: QualityChecker | None = None,
) -> Iterator[ReviewItem]:
    """The samples of a file with their checks, and their context (stored, or re-rendered from COCO).

    checker: shared by the files of one review, so a near-duplicate of a sample in an earlier file is flagged.
    """
    checker = checker or QualityChecker(config)
    fallback = split or split_from_filename(path)
    for index, rec in enumerate(read_samples(path)):
        name = split or sample_split(rec, fallback) or "unknown"
        record = lookup.find(rec.get("image")) if lookup else None
        context = rec.get("context") if isinstance(rec.get("context"), str) else None
        if context is None and record is not None:
            context = render_context(record, with_boxes=name in SPLITS_WITH_BOXES)
        view = SampleView.from_record(rec, split=name, record=record)
        # Unparsed rejects have no turns to check; their stored reasons are shown instead.
        report = checker.check(view) if "conversations" in rec else SampleReport([], {}, set(), set(), False)
        yield ReviewItem(index, rec, name, context, report, record)


# --- terminal ----------------------------------------------------------------------------------


def sample_panel(item: ReviewItem, position: str = "") -> Panel:
    """A rich panel: context, conversation, and check results of one sample.

    Every string from the sample goes through terminal_text into a Text (never parsed as markup).
    """
    parts: list[Any] = []

    def shown(text: object, style: str = "") -> Text:
        return Text(terminal_text(text, multiline=True), style=style)

    if item.context:
        parts.append(Text("Context the writer saw", style="bold magenta"))
        parts.append(shown(item.context, style="dim"))
        parts.append(Text(""))
    if "conversations" not in item.rec:
        parts.append(Text("Raw completion (did not parse)", style="bold magenta"))
        detail = item.rec.get("detail")
        parts.append(shown(str(item.rec.get("raw", "")) + (f"\n[{detail}]" if detail else "")))
    if item.rec.get("conversations"):
        parts.append(Text("Conversation", style="bold magenta"))
    for turn in item.rec.get("conversations", []):
        speaker = turn.get("from", "?")
        style = "bold cyan" if speaker == "human" else "bold green"
        line = Text(f"{terminal_text(speaker)}: ", style=style)
        line.append(terminal_text(turn.get("value", ""), multiline=True))
        parts.append(line)
    parts.append(Text(""))
    if item.report.accepted and not item.stored_reasons:
        parts.append(Text("checks: all passed", style="bold green"))
    for code, detail in item.report.details.items():
        parts.append(shown(f"✘ {code}: {detail}", style="bold red"))
    for code in item.stored_reasons:
        if code not in item.report.details:
            parts.append(shown(f"✘ {terminal_text(code)} (stored with the sample)", style="red"))
    if item.absent_objects:
        parts.append(shown(f"absent objects (asked about, must be denied): {', '.join(item.absent_objects)}", style="yellow"))
    for name, box in item.text_boxes:
        parts.append(shown(f"box in the text: {name or 'region'} {list(box)}", style="yellow"))
    if item.report.mentioned:
        objects = ", ".join(
            f"{c}{' (not in image)' if c in item.report.hallucinated else ''}" for c in sorted(item.report.mentioned)
        )
        parts.append(shown(f"objects named: {objects}", style="yellow"))
    if not item.report.objects_checked and "conversations" in item.rec:
        parts.append(Text("object check skipped (no COCO record; pass --coco-root)", style="dim"))
    title = Text(f"{position}  #{item.index + 1} in file  id {terminal_text(item.rec.get('id'))}  "
                 f"image {terminal_text(item.rec.get('image'))}  split {terminal_text(item.split)}")
    return Panel(Group(*parts), title=title, title_align="left")


def page_terminal(items: list[ReviewItem], console: Console, interactive: bool) -> None:
    """Show samples one at a time (Enter/n next, p previous, a number jumps, q quits), or all when piped."""
    if not items:
        console.print("no samples match")
        return
    if not interactive:
        for k, item in enumerate(items, 1):
            console.print(sample_panel(item, f"{k}/{len(items)}"))
        return
    pos = 0
    while True:
        console.clear()
        console.print(sample_panel(items[pos], f"{pos + 1}/{len(items)}"))
        answer = console.input("[dim]Enter/n next · p previous · number jump · q quit[/] ").strip().lower()
        if answer == "q":
            return
        if answer == "p":
            pos = max(0, pos - 1)
        elif answer.isdigit():
            pos = min(len(items) - 1, max(0, int(answer) - 1))
        elif pos == len(items) - 1:
            return
        else:
            pos += 1


# --- HTML --------------------------------------------------------------------------------------


def thumbnail_data_uri(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """A downscaled JPEG of the image as a data: URI, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_source(record: ImageRecord, lookup: ImageLookup, out_dir: Path, embed: bool) -> str | None:
    """Where the page loads the image from: a path relative to the page, or an embedded thumbnail."""
    path = lookup.path(record)
    if embed:
        return thumbnail_data_uri(path)
    if not path.is_file():
        return None
    rel = os.path.relpath(path.resolve(), out_dir.resolve())
    return quote(Path(rel).as_posix())


def page_entry(item: ReviewItem, lookup: ImageLookup | None, out_dir: Path, embed: bool) -> dict[str, Any]:
    """The JSON the page's script renders for one sample."""
    entry: dict[str, Any] = {
        "n": item.index + 1,
        "id": str(item.rec.get("id", "")),
        "image": str(item.rec.get("image", "")),
        "split": item.split,
        "context": item.context or "",
        "turns": [[str(t.get("from")), str(t.get("value"))] for t in item.rec.get("conversations", [])],
        "raw": "" if "conversations" in item.rec else str(item.rec.get("raw", "")),
        "flags": item.flags,
        "details": {**{c: "stored with the sample" for c in item.stored_reasons}, **item.report.details},
        "objects": sorted(item.report.mentioned),
        "hallucinated": sorted(item.report.hallucinated),
        "hallucinatedWords": hallucinated_words(item),
        "objectsChecked": item.report.objects_checked,
        "absent": item.absent_objects,
    }
    if item.record is not None and lookup is not None:
        entry["src"] = image_source(item.record, lookup, out_dir, embed)
        entry["w"], entry["h"] = item.record.width, item.record.height
        entry["boxes"] = [[o.category, *[round(v, 1) for v in o.bbox]] for o in item.record.objects]
        w, h = item.record.width, item.record.height
        # Boxes the sample's text mentions, in image pixels like the annotated ones (drawn dashed over them).
        entry["textBoxes"] = [[name or "region", round(x1 * w, 1), round(y1 * h, 1), round((x2 - x1) * w, 1),
                               round((y2 - y1) * h, 1)] for name, (x1, y1, x2, y2) in item.text_boxes]
    return entry


def hallucinated_words(item: ReviewItem) -> list[str]:
    """The words in the answers that named a hallucinated object ("glass of wine"), for highlighting."""
    if not item.report.hallucinated:
        return []
    answers = "\n".join(str(t.get("value", "")) for t in item.rec.get("conversations", []) if t.get("from") == "gpt")
    found = {m.phrase for m in default_matcher().mentions(answers) if m.category in item.report.hallucinated}
    return sorted(found, key=len, reverse=True)  # longest first, so the pattern prefers whole phrases


def write_html(items: list[ReviewItem], out: Path, lookup: ImageLookup | None, embed: bool, title: str) -> int:
    """Write the single static review page; returns the number of samples on it."""
    out = require_file_target(out, "--html")
    entries = [page_entry(item, lookup, out.parent, embed) for item in items]
    data = {"title": title, "reasons": REASON_DESCRIPTIONS, "samples": entries}
    write_text_atomic(out, render_page(title, data), flag="--html")  # an earlier page stays whole until then
    return len(entries)
