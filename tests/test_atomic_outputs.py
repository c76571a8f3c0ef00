"""Issue 9, whole-file outputs: a failing command leaves existing outputs byte-identical and no temporary file
behind, inputs are never modified, merge is never silently partial, export keeps one copy of each sample."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import datagen.outputs as outputs
from datagen.cli import app
from datagen.engine.shard import shard_of
from datagen.outputs import AtomicFile, OutputWriteError
from datagen.sample import OutputLayout, sample_id

REPO = Path(__file__).resolve().parent.parent
GOOD = (REPO / "tests" / "fixtures" / "good_samples.jsonl").read_text().splitlines()


def invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback fails the test
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code: int, err: str, fragment: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], (code, err)
    assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes (a leftover temporary file shows up as a new name)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def scratch() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="atomic-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class FailingFsync:
    """The `os` module of datagen.outputs, with fsync failing as on a full disk (the data never reached it)."""

    def fsync(self, fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(os, name)


class FailingHandle:
    """A file handle whose `fail_at`-th write fails as on a full disk."""

    def __init__(self, real, fail_at: int) -> None:
        self.real, self.fail_at, self.calls = real, fail_at, 0

    def write(self, data):
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.calls += 1
        return self.real.write(data)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(st.text(max_size=40), max_size=8), fail_at=st.integers(min_value=0, max_value=9))
def test_atomic_file_failing_at_any_write_keeps_the_old_file_and_leaves_nothing(chunks, fail_at):
    with scratch() as folder:
        target = folder / "out.jsonl"
        target.write_text("the old file\n")
        before = snapshot(folder)
        out = AtomicFile(target)
        out._fh = FailingHandle(out._fh, fail_at)
        try:
            with out:
                for chunk in chunks:
                    out.write(chunk)
        except OutputWriteError as exc:
            assert fail_at < len(chunks)
            assert str(exc).startswith(f"cannot write {target}: No space left on device; free disk space")
            assert snapshot(folder) == before
        else:
            assert fail_at >= len(chunks)
            assert target.read_bytes().decode("utf-8") == "".join(chunks) and set(snapshot(folder)) == {"out.jsonl"}


def _shards(folder: Path, count: int = 3, per_shard: int = 3, manifests: bool = True) -> list[Path]:
    """Shard outputs of `count` machines, each with samples, one reject and (optionally) its run manifest."""
    paths = []
    for k in range(1, count + 1):
        ids = [i for i in range(1, 500) if shard_of(i, count) == k][:per_shard]
        layout = OutputLayout(folder / f"detail.shard-{k}-of-{count}.jsonl")
        base = json.loads(GOOD[0])
        layout.samples.write_text("".join(json.dumps({**base, "id": sample_id(i)}) + "\n" for i in ids[1:]))
        layout.rejects.write_text(json.dumps({**base, "id": sample_id(ids[0]), "reject_reasons": ["refusal"]}) + "\n")
        if manifests:
            layout.runs.write_text(json.dumps({"shard": f"{k}/{count}", "images": per_shard}) + "\n")
        paths.append(layout.samples)
    return paths


def test_merge_failing_at_the_disk_keeps_existing_outputs_and_inputs(tmp_path, monkeypatch):
    shards = _shards(tmp_path)
    out = tmp_path / "merged" / "detail.jsonl"
    out.parent.mkdir()
    out.write_text("an earlier merge\n")
    OutputLayout(out).rejects.write_text("its rejects\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(outputs, "os", FailingFsync())
    code, _, err = invoke("merge", *shards, "--out", out)
    one_line_error(code, err, "cannot write")
    assert "No space left on device; free disk space" in err
    assert snapshot(tmp_path) == before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000), which=st.sampled_from(["samples", "rejects"]))
def test_merge_of_a_shard_cut_anywhere_never_modifies_it(cut, which):
    """A shard killed mid-write (its file cut at any byte): merge reads it, reports it, and never changes it."""
    with scratch() as folder:
        shards = _shards(folder)
        victim = getattr(OutputLayout(shards[1]), which)
        data = victim.read_bytes()
        victim.write_bytes(data[: cut % (len(data) + 1)])
        inputs_before = snapshot(folder)
        out = folder / "out" / "detail.jsonl"
        code, stdout, err = invoke("merge", *shards, "--out", out)
        after = snapshot(folder)
        assert {k: v for k, v in after.items() if not k.startswith("out/")} == inputs_before
        if code == 0:  # nothing was lost: the cut fell on the file's end
            assert "9 of 9 images done" in stdout
        else:
            one_line_error(code, err, "incomplete: ")
            assert not (folder / "out").exists() or not any((folder / "out").iterdir())
        code, stdout, err = invoke("merge", *shards, "--out", out, "--allow-missing")
        assert code == 0, err
        merged = out.read_text().splitlines() + OutputLayout(out).rejects.read_text().splitlines()
        assert all(json.loads(line) for line in merged)  # only whole records were copied
        assert f"{len(merged)} of 9 images done" in stdout
        assert {k for k in snapshot(folder) if k.startswith("out/")} == {"out/detail.jsonl", "out/detail.rejects.jsonl"}


def test_merge_without_manifests_is_refused_unless_allowed_and_says_what_it_knows(tmp_path):
    shards = _shards(tmp_path, manifests=False)
    out = tmp_path / "m.jsonl"
    code, _, err = invoke("merge", shards[0], shards[2], "--out", out)
    line = one_line_error(code, err, "incomplete: ")
    assert "no run manifest (detail.shard-1-of-3.runs.jsonl)" in line
    assert "shard(s) 2/3 of 3 not among the inputs" in line and "--allow-missing" in line
    assert not out.exists()
    code, _, err = invoke("merge", *shards, "--out", out)
    line = one_line_error(code, err, "incomplete: ")
    assert "not among the inputs" not in line  # every shard given, named by its file
    code, stdout, _ = invoke("merge", *shards, "--out", out, "--allow-missing")
    assert code == 0
    assert "shards 1/3, 2/3, 3/3: 9 (images assigned: unknown) images done: 6 samples" in stdout


def test_merge_with_manifests_names_the_shard_that_is_really_missing(tmp_path):
    shards = _shards(tmp_path)
    code, _, err = invoke("merge", shards[0], shards[2], "--out", tmp_path / "m.jsonl")
    line = one_line_error(code, err, "incomplete: shard(s) 2/3 of 3 not among the inputs")
    code, stdout, err = invoke("merge", *shards, "--out", tmp_path / "m.jsonl")
    assert code == 0, err
    assert "shards 1/3, 2/3, 3/3: 9 of 9 images done: 6 samples" in stdout and "3 rejects" in stdout
    assert line


def test_export_failing_midway_keeps_the_earlier_export(tmp_path):
    src = tmp_path / "detail.jsonl"
    src.write_text("\n".join(GOOD[:5]) + "\n{broken\n")
    out = tmp_path / "llava.json"
    out.write_text('["the earlier export"]\n')
    before = snapshot(tmp_path)
    code, _, err = invoke("export", src, "--out", out, "--mix", "none")
    one_line_error(code, err, f"{src}:6")
    assert snapshot(tmp_path) == before


def test_export_failing_at_the_disk_keeps_the_earlier_export(tmp_path, monkeypatch):
    src = tmp_path / "detail.jsonl"
    src.write_text("\n".join(GOOD[:5]) + "\n")
    out = tmp_path / "llava.json"
    out.write_text('["the earlier export"]\n')
    before = snapshot(tmp_path)
    monkeypatch.setattr(outputs, "os", FailingFsync())
    code, _, err = invoke("export", src, "--out", out, "--mix", "none")
    one_line_error(code, err, f"cannot write {out}: No space left on device")
    assert snapshot(tmp_path) == before


def test_export_keeps_one_copy_of_a_sample_given_twice(tmp_path):
    src = tmp_path / "detail.jsonl"
    src.write_text("\n".join(GOOD[:4]) + "\n")
    doubled = tmp_path / "again" / "detail.jsonl"  # the same samples again (two runs that wrote one output)
    doubled.parent.mkdir()
    doubled.write_text("\n".join(GOOD[:4] + GOOD[:2]) + "\n")
    out = tmp_path / "llava.json"
    code, stdout, err = invoke("export", src, doubled, "--out", out, "--mix", "none", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    ids = [rec["id"] for rec in json.loads(out.read_text())]
    unique = {json.loads(line)["id"] for line in GOOD[:4]}
    assert sorted(ids) == sorted(unique) and report["duplicate_ids"] == 6


def test_check_failing_at_the_disk_keeps_both_earlier_outputs(tmp_path, monkeypatch):
    src = tmp_path / "detail.jsonl"
    src.write_text("\n".join(GOOD) + "\n")
    accepted, rejected = tmp_path / "a.jsonl", tmp_path / "r.jsonl"
    accepted.write_text("kept\n" * 12)
    rejected.write_text("kept\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(outputs, "os", FailingFsync())
    code, _, err = invoke("check", src, "--out-accepted", accepted, "--out-rejected", rejected)
    one_line_error(code, err, f"cannot write {accepted}: No space left on device")
    assert snapshot(tmp_path) == before


def test_captions_and_review_failing_at_the_disk_leave_no_temporary_file(coco_root, tmp_path, monkeypatch):
    captions, page = tmp_path / "captions.jsonl", tmp_path / "page.html"
    captions.write_text("earlier pairs\n")
    page.write_text("<p>earlier page</p>\n")
    src = tmp_path / "detail.jsonl"
    src.write_text("\n".join(GOOD[:3]) + "\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(outputs, "os", FailingFsync())
    code, _, err = invoke("captions", "--coco-root", coco_root, "--limit", "3", "--out", captions)
    one_line_error(code, err, f"cannot write {captions}: No space left on device")
    code, _, err = invoke("review", src, "--coco-root", coco_root, "--html", page)
    one_line_error(code, err, f"cannot write {page}: No space left on device")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["export", "merge", "captions", "review", "check"])
def test_an_output_path_that_is_a_folder_is_one_line_exit_2(command, coco_root, tmp_path):
    folder = tmp_path / "out.json"
    folder.mkdir()
    src = tmp_path / "detail.jsonl"
    src.write_text("\n".join(GOOD[:3]) + "\n")
    args = {
        "export": ("export", src, "--out", folder, "--mix", "none"),
        "merge": ("merge", *_shards(tmp_path), "--out", folder),
        "captions": ("captions", "--coco-root", coco_root, "--limit", "1", "--out", folder),
        "review": ("review", src, "--coco-root", coco_root, "--html", folder),
        "check": ("check", src, "--out-accepted", folder),
    }[command]
    flag = {"review": "--html", "check": "--out-accepted"}.get(command, "--out")
    code, _, err = invoke(*args)
    one_line_error(code, err, f"{flag} {folder} is a folder")


def test_merge_prints_file_names_as_text(tmp_path):
    """A file name carrying a terminal escape is printed with it written out, never sent to the terminal raw."""
    shards = _shards(tmp_path)
    out = tmp_path / "m\x1b[2J.jsonl"
    code, stdout, err = invoke("merge", *shards, "--out", out)
    assert code == 0, err
    assert "\x1b" not in stdout + err and "m\\x1b[2J.jsonl" in stdout
