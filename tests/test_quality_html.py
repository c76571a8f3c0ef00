"""The HTML review page, loaded in headless Chromium: images shown, boxes drawn over them, filters work."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

import pytest
from guards import HANG_GUARD_S

from datagen.cli import main
from datagen.coco import CocoIndex

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it via .ci/run)")


def datagen(*args: object) -> None:
    with mock.patch.object(sys, "argv", ["datagen", *map(str, args)]):
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code


def chromium(tmp_path: Path, url: str, *flags: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--window-size=1280,2400", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S)


class CardParser(HTMLParser):
    """Collects, per sample card, the figure's data attributes and the drawn box categories."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "article":
            self.cards.append({"id": attrs.get("data-id"), "figure": {}, "boxes": [], "class": attrs.get("class", "")})
        elif tag == "figure" and self.cards:
            self.cards[-1]["figure"] = attrs
        elif tag == "rect" and self.cards and "box" in (attrs.get("class") or ""):
            self.cards[-1]["boxes"].append(attrs.get("data-category"))


def dump(tmp_path: Path, url: str) -> CardParser:
    proc = chromium(tmp_path, url, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    parser = CardParser()
    parser.feed(proc.stdout)
    parser.dom = proc.stdout
    return parser


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("review") / "samples.jsonl"
    good = [json.loads(line) for line in (FIXTURES / "good_samples.jsonl").read_text().splitlines()][:6]
    bad = {**good[0], "id": "leaky", "conversations": [
        {"from": "human", "value": "<image>\nWhat is there?"},
        {"from": "gpt", "value": "As the caption says, a dog sleeps under the table."}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good, bad]))
    return path


def expected_boxes(coco_root: Path, samples: Path) -> dict[str, list[str]]:
    index = CocoIndex(coco_root, "val2017")
    by_name = {info["file_name"]: image_id for image_id, info in index.captions.imgs.items()}
    out = {}
    for line in samples.read_text().splitlines():
        rec = json.loads(line)
        out[rec["id"]] = sorted(o.category for o in index.record(by_name[rec["image"]]).objects)
    return out


def test_page_shows_images_with_their_boxes(coco_root, samples_file, tmp_path):
    page = tmp_path / "site" / "review.html"
    datagen("review", samples_file, "--html", page, "--coco-root", coco_root, "--coco-split", "val2017")
    html = page.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    assert 'src="' not in html  # images are set by the script, lazily, from relative paths
    parsed = dump(tmp_path, page.as_uri())
    expected = expected_boxes(coco_root, samples_file)
    assert parsed.body.get("data-rendered-cards") == "7" and len(parsed.cards) == 7
    loaded = [c for c in parsed.cards if c["figure"].get("data-image-loaded") == "1"]
    assert len(loaded) >= 3 and parsed.cards[0] in loaded
    assert not any("data-image-error" in c["figure"] for c in parsed.cards)
    for card in loaded:
        assert sorted(card["boxes"]) == expected[card["id"]]
        assert card["figure"]["data-boxes-drawn"] == str(len(expected[card["id"]]))
    assert "rejected" in parsed.cards[-1]["class"] and parsed.cards[-1]["id"] == "leaky"
    assert parsed.dom.count('<mark class="halluc"') == 1 and ">dog</mark>" in parsed.dom  # 139 shows no dog

    shot = tmp_path / "shot.png"
    proc = chromium(tmp_path, page.as_uri(), f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.is_file()
    from PIL import Image, ImageStat

    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        # The first card's photo occupies roughly x 30-500, y 60-400: real picture content, not a blank box.
        crop = img.convert("RGB").crop((40, 80, 480, 360))
        assert max(ImageStat.Stat(crop).stddev) > 20


def test_filters_from_the_url(coco_root, samples_file, tmp_path):
    page = tmp_path / "review.html"
    datagen("review", samples_file, "--html", page, "--coco-root", coco_root)
    flagged = dump(tmp_path, page.as_uri() + "#reason=source_leak")
    assert [c["id"] for c in flagged.cards] == ["leaky"]
    detail = dump(tmp_path, page.as_uri() + "#split=conversation&reason=__ok")
    assert detail.cards and all(c["id"].endswith("conversation") for c in detail.cards)


def test_embedded_images_make_one_portable_file(coco_root, samples_file, tmp_path):
    page = tmp_path / "one.html"
    datagen("review", samples_file, "--html", page, "--coco-root", coco_root, "--embed-images", "--limit", "2")
    moved = tmp_path / "elsewhere" / "copy.html"
    moved.parent.mkdir()
    moved.write_bytes(page.read_bytes())  # no relative paths left to break
    assert page.read_text().count("data:image/jpeg;base64,") == 2
    parsed = dump(tmp_path, moved.as_uri())
    assert [c["figure"].get("data-image-loaded") for c in parsed.cards] == ["1", "1"]
    assert all(c["boxes"] for c in parsed.cards)


HOSTILE_TEXTS = [
    "<!--<script>",
    "</script><script>document.title='PWNED';document.body.setAttribute('data-pwned','1')</script>",
    "<script>document.title='PWNED'</script>",
    "<img src=x onerror=\"document.title='PWNED';document.body.setAttribute('data-pwned','1')\">",
    "<svg onload=\"document.body.setAttribute('data-pwned','1')\"></svg> ]]> <![CDATA[ --> </title>",
    "\"double\" 'single' `back` &amp; &lt;b&gt; & < > \\",
    "line\u2028separator\u2029paragraph",
    "\u202eright-to-left override\u202c and \u2067isolate",
    "w" * 3000,
    "__DATA__ __TITLE__ ${document.title='PWNED'} {{7*7}}",
]


TITLE = "__DATA__ </title><script>document.title='PWNED'</script>"


def hostile_samples(path: Path) -> list[dict]:
    recs = []
    for i, text in enumerate(HOSTILE_TEXTS):
        recs.append({"id": f"h{i}<b>{text[:40]}", "image": text[:60], "split": f"s<i>{i % 2}",
                     "conversations": [{"from": "human", "value": "<image>\n" + text},
                                       {"from": "gpt", "value": f"answer {i}: {text}"}]})
    # A reject that never parsed, with hostile stored reasons (one named like an Object property).
    recs.append({"id": "raw<script>", "image": "x.jpg", "raw": HOSTILE_TEXTS[1] + HOSTILE_TEXTS[0],
                 "reject_reasons": ["__proto__", "constructor", "<img src=x onerror=alert(1)>"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


class TextByCard(HTMLParser):
    """The text of each sample card, as shown."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cards: dict[str, list[str]] = {}
        self.title: list[str] = []
        self.body: dict[str, str] = {}
        self._card: str | None = None
        self._depth = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        self._in_title = tag == "title"
        if tag == "article":
            self._card, self._depth = attrs["data-id"], 0
            self.cards[self._card] = []
        if self._card is not None:
            self._depth += 1

    def handle_endtag(self, tag):
        self._in_title = False
        if self._card is not None:
            self._depth -= 1
            if tag == "article":
                self._card = None

    def handle_data(self, data):
        if self._in_title:
            self.title.append(data)
        if self._card is not None:
            self.cards[self._card].append(data)


def test_hostile_samples_all_shown_and_none_of_their_scripts_run(tmp_path):
    src = tmp_path / "hostile.jsonl"
    recs = hostile_samples(src)
    page = tmp_path / "hostile.html"
    datagen("review", src, "--html", page, "--title", TITLE)
    proc = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = TextByCard()
    dom.feed(proc.stdout)
    # The page's own script ran (every card rendered) and none of the samples' did.
    assert dom.body.get("data-rendered-cards") == str(len(recs))
    assert "data-pwned" not in dom.body and "".join(dom.title) == TITLE
    assert sorted(dom.cards) == sorted(r["id"] for r in recs)
    for rec in recs:
        shown = "".join(dom.cards[rec["id"]])
        if "conversations" in rec:
            for turn in rec["conversations"]:
                assert turn["value"].removeprefix("<image>\n") in shown
            assert rec["split"] in shown
        else:
            assert rec["raw"] in shown and all(code in shown for code in rec["reject_reasons"])

    shot = tmp_path / "hostile.png"
    proc = chromium(tmp_path, page.as_uri(), f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.is_file()


class Labels(HTMLParser):
    """Per figure: the image size from the svg's viewBox, the label chips, and the legend's entries."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append({"attrs": attrs, "chips": [], "legend": [], "size": None})
        elif tag == "svg" and self.figures and attrs.get("viewbox"):
            self.figures[-1]["size"] = [float(v) for v in attrs["viewbox"].split()[2:]]
        elif tag == "rect" and attrs.get("class") == "label":
            self.figures[-1]["chips"].append([float(attrs[k]) for k in ("x", "y", "width", "height")])
        elif tag == "span" and "data-category" in attrs and self.figures:
            self.figures[-1]["legend"].append(attrs["data-category"])


def test_crowded_images_get_labels_inside_the_image_without_overlap(coco_root, tmp_path):
    # 000000000139 has 20 boxes, 000000350679 26 (11 cakes, 10 people), 000000183709 24 on a portrait image.
    ids = [139, 350679, 183709]
    src = tmp_path / "crowded.jsonl"
    src.write_text("".join(json.dumps({
        "id": str(i), "image": f"{i:012d}.jpg", "split": "detail",
        "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A busy scene."}],
    }) + "\n" for i in ids))
    page = tmp_path / "crowded.html"
    datagen("review", src, "--html", page, "--coco-root", coco_root, "--embed-images")
    proc = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = Labels()
    parsed.feed(proc.stdout)
    index = CocoIndex(coco_root, "val2017")
    assert len(parsed.figures) == len(ids)
    for image_id, fig in zip(ids, parsed.figures):
        record = index.record(image_id)
        assert fig["attrs"].get("data-image-loaded") == "1"
        assert fig["size"] == [record.width, record.height]
        boxes = len(record.objects)
        assert int(fig["attrs"]["data-labels-drawn"]) + int(fig["attrs"]["data-labels-dropped"]) == boxes
        assert len(fig["chips"]) == int(fig["attrs"]["data-labels-drawn"]) >= boxes * 0.8
        for x, y, w, h in fig["chips"]:
            assert 0 <= x and 0 <= y and x + w <= record.width + 0.01 and y + h <= record.height + 0.01
        for i, a in enumerate(fig["chips"]):
            for b in fig["chips"][i + 1:]:
                apart = a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]
                assert apart, (image_id, a, b)
        # The legend names every category, so a label left out for lack of room is still accounted for.
        assert sorted(fig["legend"]) == sorted({o.category for o in record.objects})
