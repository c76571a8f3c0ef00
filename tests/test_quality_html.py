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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


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
