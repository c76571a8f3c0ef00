"""The COCO index renders exactly what pycocotools-read annotations render, and is reused until stale."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO

from datagen.coco import CocoIndex, ImageRecord, ObjectBox, ensure_index, open_index
from datagen.coco_stream import NotAnObjectError, stream_top_level
from datagen.context import render_context
from datagen.errors import VisinstructError
from engine_support import datagen_here  # the CLI in this process


def reference_contexts(root: Path, split: str) -> dict[int, tuple[str, str]]:
    """Contexts rendered the way main read COCO before the index: pycocotools, per image."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        caps = COCO(str(root / "annotations" / f"captions_{split}.json"))
        inst = COCO(str(root / "annotations" / f"instances_{split}.json"))
    names = {c["id"]: c["name"] for c in inst.dataset.get("categories", [])}
    out = {}
    for image_id in sorted(i for i, anns in caps.imgToAnns.items() if anns):
        info = caps.imgs[image_id]
        lines = [a["caption"].strip() for a in caps.imgToAnns[image_id]]
        text = "\n".join(lines)
        boxes = []
        for ann in inst.imgToAnns.get(image_id, []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            W, H = int(info["width"]), int(info["height"])
            boxes.append(f"{names[ann['category_id']]}: {[round(x / W, 3), round(y / H, 3), round((x + w) / W, 3), round((y + h) / H, 3)]}")
        out[image_id] = (text, f"{text}\n\n" + "\n".join(boxes) if boxes else text)
    return out


def index_contexts(root: Path, split: str, index_dir: Path) -> dict[int, tuple[str, str]]:
    index = CocoIndex(root, split, index_dir=index_dir)
    return {i: (render_context(index.record(i), with_boxes=False), render_context(index.record(i), with_boxes=True))
            for i in index.image_ids()}


words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)
coord = st.one_of(st.integers(0, 700), st.floats(0, 700, allow_nan=False).map(lambda v: round(v, 2)))


@st.composite
def coco_files(draw):
    """A random but valid captions + instances pair (shuffled annotations, shared and missing images)."""
    image_ids = draw(st.lists(st.integers(0, 10**12), min_size=1, max_size=8, unique=True))
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": draw(st.integers(1, 1000)),
               "height": draw(st.sampled_from([1, 427, 480, 640, 999]))} for i in image_ids]
    cats = [{"id": c, "name": draw(words), "supercategory": "x"} for c in draw(st.lists(st.integers(1, 90), min_size=1, max_size=5, unique=True))]
    captions = [{"id": n, "image_id": draw(st.sampled_from(image_ids)), "caption": draw(words)}
                for n in range(draw(st.integers(0, 20)))]
    objects = [{"id": 1000 + n, "image_id": draw(st.sampled_from(image_ids)), "category_id": draw(st.sampled_from(cats))["id"],
                "bbox": [draw(coord) for _ in range(4)], "iscrowd": draw(st.sampled_from([0, 1])),
                "segmentation": [[1.5, 2.5, 3.5]], "area": 1.0}
               for n in range(draw(st.integers(0, 25)))]
    return ({"info": {"v": 1}, "images": images, "annotations": captions},
            {"categories": cats, "annotations": objects, "images": images})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=coco_files(), indent=st.sampled_from([None, 1]))
def test_index_renders_byte_identical_contexts_to_pycocotools(tmp_path_factory, files, indent):
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    for kind, data in zip(("captions", "instances"), files):
        (root / "annotations" / f"{kind}_val2017.json").write_text(json.dumps(data, indent=indent))
    assert index_contexts(root, "val2017", root / "idx") == reference_contexts(root, "val2017")


def test_index_matches_pycocotools_on_coco_mini(coco_root, tmp_path):
    for split in ("val2017", "train2017"):
        assert index_contexts(coco_root, split, tmp_path) == reference_contexts(coco_root, split)


@settings(max_examples=80, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=5), st.one_of(
    st.lists(st.recursive(st.none() | st.integers() | st.text(max_size=8) | st.floats(allow_nan=False),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3)), max_size=6),
    st.integers(), st.text(max_size=10))), chunk=st.integers(1, 9))
def test_streamed_top_level_equals_json_load(doc, chunk):
    text = json.dumps(doc)
    seen: dict = {}

    def start(key, is_array):
        seen[key] = [] if is_array else None

    def element(key, item):
        if isinstance(seen[key], list):
            seen[key].append(item)
        else:
            seen[key] = item

    stream_top_level(io.StringIO(text), start, element, chunk_chars=chunk)
    assert seen == json.loads(text)


@pytest.mark.parametrize("text", ["{", '{"a": [1, 2', '{"a": 1} x', '{"a" 1}', "", '{"a": [1,]}', '{"a": "x', '{"a": [0.]}'])
def test_streamed_reader_rejects_what_json_load_rejects(text):
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        stream_top_level(io.StringIO(text), lambda k, a: None, lambda k, v: None, chunk_chars=2)


def test_streamed_reader_refuses_a_top_level_that_is_not_an_object():
    with pytest.raises(NotAnObjectError):
        stream_top_level(io.StringIO("[1, 2]"), lambda k, a: None, lambda k, v: None)


def test_index_is_reused_and_rebuilt_when_an_annotation_file_changes(coco_root, tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for name in ("captions_val2017.json", "instances_val2017.json"):
        (root / "annotations" / name).write_bytes((coco_root / "annotations" / name).read_bytes())
    first = ensure_index(root, "val2017", index_dir=tmp_path / "idx")
    stamp = first.stat().st_mtime_ns
    assert ensure_index(root, "val2017", index_dir=tmp_path / "idx") == first and first.stat().st_mtime_ns == stamp
    # A captions-only reader is served by the full index (no second build).
    assert ensure_index(root, "val2017", with_instances=False, index_dir=tmp_path / "idx") == first
    caps = root / "annotations" / "captions_val2017.json"
    data = json.loads(caps.read_text())
    first_id = data["annotations"][0]["image_id"]
    for ann in data["annotations"]:
        if ann["image_id"] == first_id:
            ann["caption"] = "Changed caption."
    caps.write_text(json.dumps(data))
    os.utime(caps, ns=(stamp, stamp))  # same mtime as before: size and inode still tell
    rebuilt = CocoIndex(root, "val2017", index_dir=tmp_path / "idx")
    assert rebuilt.record(first_id).captions[0] == "Changed caption."
    assert [p.name for p in (tmp_path / "idx").iterdir()] == [first.name]  # replaced, no temp files left


def test_index_opens_by_path_and_pickles_by_path(coco_root, tmp_path):
    index = CocoIndex(coco_root, "val2017", index_dir=tmp_path)
    worker = open_index(index.index_path)
    again = pickle.loads(pickle.dumps(index))
    assert len(pickle.dumps(index)) < 1000
    for other in (worker, again):
        assert other.image_ids() == index.image_ids() and other.image_dir == index.image_dir
        assert other.record(397133) == index.record(397133)
    with pytest.raises(VisinstructError, match="cannot open COCO index"):
        open_index(tmp_path / "missing.cocoidx")


@pytest.mark.parametrize("payload, message", [
    ('{"annotations": [{"image_id": 1}]}', "missing 'id'"),
    ('{"images": {}, "annotations": []}', "'images' is not a list"),
    ("[1, 2]", "not a JSON object"),
    ('{"annotations": [{"id": 1, "image_id": 1, "caption": "a"}]', "malformed COCO JSON"),
])
def test_malformed_annotation_files_are_one_line_user_errors(tmp_path, payload, message):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(payload)
    with pytest.raises(VisinstructError, match=message):
        CocoIndex(tmp_path, "val2017", with_instances=False, index_dir=tmp_path / "idx")
    assert not (tmp_path / "idx").exists() or not list((tmp_path / "idx").iterdir())


def test_coco_index_command_builds_reports_and_rebuilds_a_stale_index(coco_root, tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for name in ("captions_val2017.json", "instances_val2017.json"):
        (root / "annotations" / name).write_bytes((coco_root / "annotations" / name).read_bytes())
    env = {"VISINSTRUCT_INDEX_DIR": str(tmp_path / "idx")}
    args = ("coco", "index", "--coco-root", str(root), "--coco-split", "val2017")
    built = datagen_here(*args, env=env)
    assert built.returncode == 0, built.stderr
    assert "index built in" in built.stdout and "79 captioned images, captions and boxes" in built.stdout
    (index_file,) = (tmp_path / "idx").iterdir()
    assert str(index_file) in built.stdout.replace("\n", "")
    stamp = index_file.stat().st_mtime_ns
    again = datagen_here(*args, env=env)
    assert "index up to date" in again.stdout and index_file.stat().st_mtime_ns == stamp
    # What the command built is what a run opens: same file, not rebuilt.
    assert ensure_index(root, "val2017", index_dir=tmp_path / "idx") == index_file
    assert index_file.stat().st_mtime_ns == stamp
    # A changed annotation file makes it stale: the command rebuilds it in place.
    caps = root / "annotations" / "captions_val2017.json"
    data = json.loads(caps.read_text())
    data["annotations"] = data["annotations"][1:]
    caps.write_text(json.dumps(data))
    rebuilt = datagen_here(*args, env=env)
    assert "index built in" in rebuilt.stdout
    assert [p.name for p in (tmp_path / "idx").iterdir()] == [index_file.name]
    # Without an instances file it indexes the captions alone.
    (root / "annotations" / "instances_val2017.json").unlink()
    captions = datagen_here(*args, env=env)
    assert "captions only" in captions.stdout, captions.stdout
    missing = datagen_here("coco", "index", "--coco-root", str(tmp_path / "nowhere"), env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("error: COCO root not found")
    no_split = datagen_here("coco", "index", "--coco-root", str(root), "--coco-split", "train2014", env=env)
    assert no_split.returncode == 2 and "annotation file not found" in no_split.stderr


# --- records sent to judge processes and Ray workers: pickled as fields, boxes as tuples --------------------------

_BOXES = st.builds(
    lambda category, box, crowd: ObjectBox(category=category, bbox=box, iscrowd=crowd),
    st.text(max_size=12), st.tuples(*[st.floats(allow_nan=False, width=64)] * 4), st.booleans(),
)
_RECORDS = st.builds(
    lambda image_id, name, size, captions, boxes: ImageRecord(id=image_id, file_name=name, width=size[0],
                                                              height=size[1], captions=captions, objects=boxes),
    st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1), st.text(max_size=30),
    st.tuples(st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)), st.lists(st.text(max_size=40), max_size=6),
    st.lists(_BOXES, max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(_RECORDS, st.sampled_from([2, 4, 5]))
def test_records_pickle_to_equal_records(record, protocol):
    blob = pickle.dumps(record, protocol=protocol)
    again = pickle.loads(blob)
    assert type(again) is ImageRecord and again == record
    assert again.model_dump() == record.model_dump()
    assert all(type(box) is ObjectBox for box in again.objects)
    assert copy.deepcopy(record) == record


def test_records_pickle_smaller_than_pydantic_state():
    record = ImageRecord(id=1, file_name="a.jpg", width=640, height=480, captions=["a dog on a sofa"] * 5,
                         objects=[ObjectBox(category="dog", bbox=(1.5, 2.0, 30.0, 40.0))] * 9)
    assert len(pickle.dumps(record)) < 0.7 * len(pickle.dumps(record.__getstate__()))


class _Tagged(ImageRecord):
    tag: str = ""


def test_record_subclasses_keep_their_type_and_fields_when_pickled():
    record = _Tagged(id=2, file_name="b.jpg", width=1, height=1, captions=["x"], tag="kept")
    again = pickle.loads(pickle.dumps(record))
    assert type(again) is _Tagged and again.tag == "kept" and again == record
