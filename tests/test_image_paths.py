"""One path rule for images: a sample's image resolves inside its image folder or is refused, everywhere."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datagen.cli import main
from datagen.quality import QualityChecker, SampleView
from datagen.sample import ImagePathError, image_path_problem, resolve_image

BOUNDED = settings(max_examples=80, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TURNS = [("human", "<image>\nWhat is on the table?"), ("gpt", "A bowl of fruit sits on the wooden table.")]

# Path pieces: ordinary names, names that are links (see `tree`), and what an attacker would write.
SAFE_PART = st.sampled_from(["a.jpg", "sub", "train2017", "000000000139.jpg", "x y.png", "é.jpg", ".hidden", "..."])
HOSTILE_PART = st.sampled_from([
    "..", ".", "", "/", "//", "\\", "..\\..", "out", "loop", "inside", "javascript:alert(1)", "file:", "file:///etc/passwd",
    "C:", "http://x/y.jpg", "\x00", "a\x00b", "\x1b[2J", "~", "%2e%2e", "/etc/passwd", "\n",
])
HOSTILE_PATH = st.lists(st.one_of(SAFE_PART, HOSTILE_PART), min_size=1, max_size=5).map("/".join)
NON_STRINGS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """images/ with a real file, a link leading out, a link staying in, and a link loop; secret/ beside it."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "a.jpg").write_bytes(b"secret")
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"img")
    (folder / "sub" / "a.jpg").write_bytes(b"img")
    (folder / "out").symlink_to(secret, target_is_directory=True)
    (folder / "inside").symlink_to(folder / "sub", target_is_directory=True)
    (folder / "loop").symlink_to(folder / "loop")
    return folder


@BOUNDED
@given(image=st.one_of(HOSTILE_PATH, NON_STRINGS))
def test_resolved_images_stay_inside_the_folder(tree, image):
    try:
        path = resolve_image(tree, image)
    except ImagePathError as exc:
        assert exc.problem and str(exc).startswith("image ")
        return
    assert isinstance(image, str) and image_path_problem(image) is None
    assert path.resolve().is_relative_to(tree.resolve())
    assert Path(image).parts[:1] != ("out",)  # the one link leading out is never followed


@BOUNDED
@given(parts=st.lists(SAFE_PART, min_size=1, max_size=4))
def test_plain_relative_names_are_accepted(tree, parts):
    image = "/".join(parts)
    assert image_path_problem(image) is None
    assert resolve_image(tree, image) == tree / image


@pytest.mark.parametrize("image", ["/etc/passwd", "../secret/a.jpg", "sub/../../secret/a.jpg", "out/a.jpg",
                                   "javascript:alert(1)", "file:///etc/passwd", "C:\\secret", "a\x00.jpg", 7, ["a"]])
def test_each_way_out_is_refused(tree, image):
    with pytest.raises(ImagePathError):
        resolve_image(tree, image)


def test_links_that_stay_inside_and_trusted_absolute_paths_are_allowed(tree, tmp_path):
    assert resolve_image(tree, "inside/a.jpg") == tree / "inside" / "a.jpg"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "x.jpg").write_bytes(b"img")
    assert resolve_image(tree, str(cache / "x.jpg"), trusted=[cache]) == cache / "x.jpg"
    for escape in (str(cache / ".." / "secret" / "a.jpg"), str(tmp_path / "secret" / "a.jpg")):
        with pytest.raises(ImagePathError):
            resolve_image(tree, escape, trusted=[cache])


@BOUNDED
@given(image=st.one_of(HOSTILE_PATH, NON_STRINGS))
def test_check_flags_bad_image_path_exactly_when_the_rule_refuses(image):
    view = SampleView(key="s", turns=list(TURNS), split="conversation", image=image)
    report = QualityChecker().check(view)
    refused = image not in (None, "") and image_path_problem(image) is not None
    assert ("bad_image_path" in report.reasons) == refused


def run(capsys, *args: object) -> tuple[int, str, str]:
    with mock.patch.object(sys, "argv", ["datagen", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


HOSTILE_IMAGES = ["/etc/passwd", "../secret/a.jpg", "out/a.jpg", "javascript:alert(1)", "file:///etc/passwd",
                  "a\x00.jpg", 5, {"path": "/etc/passwd"}, "loop/a.jpg"]


def write_samples(path: Path, images: list) -> None:
    recs = [{"id": f"s{i}", "image": image, "conversations": [{"from": s, "value": v} for s, v in TURNS]}
            for i, image in enumerate(images)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.parametrize("with_folder", [True, False])
def test_export_never_copies_a_bad_image_path_even_with_keep_missing(capsys, tree, tmp_path, with_folder):
    src = tmp_path / "conversation.jsonl"
    write_samples(src, ["a.jpg", "sub/missing.jpg", *HOSTILE_IMAGES])
    out = tmp_path / "mix.json"
    folder = ["--image-folder", tree] if with_folder else []
    code, stdout, err = run(capsys, "export", src, "--out", out, "--mix", "none", "--keep-missing", *folder)
    assert code == 0, err
    written = json.loads(out.read_text())
    # Without a folder only the name can be judged: the links (out/, loop/) are caught where a folder is known.
    expected = ["a.jpg", "sub/missing.jpg"] + ([] if with_folder else ["loop/a.jpg", "out/a.jpg"])
    assert sorted(r["image"] for r in written) == sorted(expected)
    assert f"{len(HOSTILE_IMAGES) - (0 if with_folder else 2)} samples with a bad image path dropped" in stdout


def test_check_reports_bad_image_path(capsys, tmp_path):
    src = tmp_path / "conversation.jsonl"
    write_samples(src, ["a.jpg", *HOSTILE_IMAGES])
    code, out, err = run(capsys, "check", src, "--json")
    assert code == 0, err
    # "out/a.jpg" and "loop/a.jpg" look like plain names; only a folder (trainer, export) shows where they lead.
    assert json.loads(out)["reject_reasons"]["bad_image_path"] == len(HOSTILE_IMAGES) - 2


def test_trainer_refuses_naming_the_sample(tree, tmp_path, monkeypatch):
    from train.data import resolve_image_path  # imports torch and transformers
    from model.errors import TrainError

    monkeypatch.setenv("VISINSTRUCT_IMAGE_CACHE", str(tmp_path / "cache"))
    assert resolve_image_path(tree, {"id": "ok", "image": "sub/a.jpg"}) == tree / "sub" / "a.jpg"
    for image in HOSTILE_IMAGES:
        with pytest.raises(TrainError, match=r"^sample bad-7: image .* \(image folder .*images\); an image path is"):
            resolve_image_path(tree, {"id": "bad-7", "image": image})
    extracted = tmp_path / "cache" / "0123.jpg"
    extracted.parent.mkdir()
    extracted.write_bytes(b"img")
    assert resolve_image_path(tree, {"id": "hf", "image": str(extracted)}) == extracted
    assert os.path.exists(resolve_image_path(tree, {"id": "hf", "image": str(extracted)}))


def test_unreadable_image_error_names_the_sample(tmp_path):
    from train.images import load_image  # imports torch
    from model.errors import TrainError

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(TrainError, match=r"^sample s9: cannot read image .*broken\.jpg"):
        load_image(broken, "s9")
