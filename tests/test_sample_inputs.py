"""Commands that take sample files skip the files datagen writes beside its outputs (issue 10, item 4)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from datagen.cli import app, main
from datagen.errors import VisinstructError
from datagen.engine.shard import shard_of
from datagen.sample import (REJECTS_KIND, OutputLayout, read_samples, sample_id, sample_inputs, samples_beside,
                            written_beside_kind)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = FIXTURES / "good_samples.jsonl"

# Every file OutputLayout names beside an output, and what it is; `judged` is samples (the judge kept them).
COMPANIONS = {"runs": "run manifest", "failures": "failures list", "batch_state": "Batch API state",
              "rejects": REJECTS_KIND, "judge_rejects": REJECTS_KIND}
OWN_SUFFIX = re.compile(r"\.(?:runs|failures|rejects|judge-rejects|batch)$")

stems = st.text(st.sampled_from("abcdefghij-_.0123456789"), min_size=1, max_size=20).filter(
    lambda s: not OWN_SUFFIX.search(s) and s not in (".", "..") and not s.startswith("."))
folders = st.lists(st.text(st.sampled_from("abcxyz_-"), min_size=1, max_size=6), max_size=3)


def layout_of(folder: list[str], stem: str) -> OutputLayout:
    return OutputLayout(Path("/data", *folder, stem + ".jsonl"))


@settings(max_examples=200, deadline=None)
@given(folders, stems)
def test_every_file_the_layout_names_is_recognised_and_the_samples_file_is_not(folder, stem):
    layout = layout_of(folder, stem)
    assert written_beside_kind(layout.samples) is None
    assert written_beside_kind(layout.judged) is None
    for name, kind in COMPANIONS.items():
        assert written_beside_kind(getattr(layout, name)) == kind, name
        assert samples_beside(getattr(layout, name)) == layout.samples
    assert samples_beside(layout.batch_failures) == layout.samples
    assert written_beside_kind(layout.batch_dir) == "Batch API files"
    assert written_beside_kind(layout.batch_failures) == "Batch API files"
    assert written_beside_kind(layout.batch_dir / "batch_abc.output.jsonl") == "Batch API files"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(folders, stems), min_size=1, max_size=4, unique_by=lambda t: (tuple(t[0]), t[1])),
       st.data(), st.booleans())
def test_inputs_are_sorted_into_read_and_skipped(outputs, data, with_rejects):
    files: list[tuple[Path, str | None]] = []
    for folder, stem in outputs:
        layout = layout_of(folder, stem)
        candidates = [(layout.samples, None), (layout.judged, None)]
        candidates += [(getattr(layout, name), kind) for name, kind in COMPANIONS.items()]
        candidates += [(layout.batch_failures, "Batch API files")]
        files += data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=len(candidates), unique=True))
    assume(len({p for p, _ in files}) == len(files))
    paths = [p for p, _ in files]
    only_rejects = all(kind == REJECTS_KIND for _, kind in files)
    readable = {p for p, kind in files if kind is None or (kind == REJECTS_KIND and (with_rejects or only_rejects))}
    if not readable:
        with pytest.raises(VisinstructError, match="no sample file among the inputs"):
            sample_inputs(paths, with_rejects)
        return
    found = sample_inputs(paths, with_rejects)
    assert found.read == [p for p in paths if p in readable]  # order kept
    assert [p for p, _ in found.skipped] == [p for p in paths if p not in readable]
    assert all(kind == dict(files)[p] for p, kind in found.skipped)
    note = found.note()
    assert (note is None) == (not found.skipped)
    if note:
        assert all(str(p) in note for p, _ in found.skipped)
        assert ("--with-rejects" in note) == any(kind == REJECTS_KIND for _, kind in found.skipped)


def test_merge_never_reads_rejects_given_as_inputs():
    layout = OutputLayout(Path("data/detail.shard-1-of-2.jsonl"))
    found = sample_inputs([layout.samples, layout.rejects, layout.runs], with_rejects=True, rejects_readable=False)
    assert found.read == [layout.samples]
    with pytest.raises(VisinstructError):
        sample_inputs([layout.rejects], rejects_readable=False)


def test_hub_ids_are_samples():
    assert written_beside_kind("hf://org/detail.rejects") is None


# --- the commands --------------------------------------------------------------------------------


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def run_main(capsys, *args: object) -> tuple[int, str, str]:
    """`datagen ARGS` through the entry point (its error handling), in this process."""
    with mock.patch.object(sys, "argv", ["datagen", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def generated_folder(tmp_path) -> Path:
    """A data/ folder as `datagen generate` leaves it: samples, rejects, manifest, failures, Batch API state."""
    records = [json.loads(line) for line in GOOD.read_text().splitlines() if line.strip()]
    data = tmp_path / "data"
    data.mkdir()
    for split in ("conversation", "detail"):
        layout = OutputLayout(data / f"{split}.jsonl")
        mine = [{**r, "split": split} for r in records if r["id"].endswith(split)] or [{**records[0], "split": split}]
        layout.samples.write_text("".join(json.dumps(r) + "\n" for r in mine))
        layout.rejects.write_text(json.dumps({**mine[0], "id": "rej", "reject_reasons": ["refusal"]}) + "\n")
        layout.runs.write_text(json.dumps({"shard": None, "images": 3, "config": {}}) + "\n")
        layout.failures.write_text(json.dumps({"id": "000000000001", "error": "timeout"}) + "\n")
    OutputLayout(data / "detail.jsonl").batch_state.write_text(json.dumps({"split": "detail", "batches": []}))
    return data


def samples_in(data: Path) -> int:
    return sum(len(OutputLayout(p).samples.read_text().splitlines()) for p in sorted(data.glob("*.jsonl"))
               if written_beside_kind(p) is None)


def test_export_of_a_glob_skips_the_tools_files_and_says_so(generated_folder):
    data = generated_folder
    out = data.parent / "mix.json"
    result = invoke("export", *sorted(data.glob("*")), "--out", out, "--mix", "none")
    assert result.exit_code == 0, result.output
    assert "note: skipped 7 file(s)" in result.stderr and "conversation.runs.jsonl (run manifest)" in result.stderr
    assert "--with-rejects" in result.stderr
    exported = json.loads(out.read_text())
    assert isinstance(exported, list) and len(exported) == samples_in(data)


@pytest.mark.parametrize("name, as_array", [("mix.jsonl", False), ("mix.json", True), ("mix.JSON", True),
                                            ("mix.txt", False)])
def test_export_out_extension_decides_the_format(generated_folder, name, as_array):
    out = generated_folder.parent / name
    result = invoke("export", *sorted(generated_folder.glob("*.jsonl")), "--out", out, "--mix", "none")
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.lstrip().startswith("[") == as_array
    if not as_array:
        assert all(json.loads(line)["conversations"] for line in text.splitlines())
    assert len(list(read_samples(out))) == samples_in(generated_folder)


def test_stats_reads_rejects_when_asked(generated_folder):
    data = generated_folder
    everything = invoke("stats", *sorted(data.glob("*.jsonl")), "--json")
    assert everything.exit_code == 0 and json.loads(everything.stdout)["all"]["rejected"] == 0
    asked = invoke("stats", *sorted(data.glob("*.jsonl")), "--json", "--with-rejects")
    assert json.loads(asked.stdout)["all"]["rejected"] == 2 and "note: skipped 4 file(s)" in asked.stderr
    only = invoke("stats", *sorted(data.glob("*.rejects.jsonl")), "--json")
    assert only.exit_code == 0 and json.loads(only.stdout)["all"]["rejected"] == 2 and "skipped" not in only.stderr


def test_check_review_and_merge_refuse_a_manifest_with_one_line(generated_folder, capsys):
    for command in (["check"], ["review"], ["stats"], ["merge", "--out", generated_folder / "m.jsonl"]):
        code, _, err = run_main(capsys, *command, generated_folder / "detail.runs.jsonl")
        assert code == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "run manifest" in lines[0], err
        assert lines[0].endswith(f"e.g. {generated_folder / 'detail.jsonl'}")


def test_review_of_a_folder_glob_pages_only_samples(generated_folder):
    page = generated_folder.parent / "page.html"
    result = invoke("review", *sorted(generated_folder.glob("*")), "--html", page)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(f"{samples_in(generated_folder)} samples -> {page}")


def test_merge_of_a_shard_glob_reads_the_shards_and_finds_their_rejects_itself(tmp_path):
    ids = {k: [i for i in range(1, 100) if shard_of(i, 2) == k][:2] for k in (1, 2)}
    for k in (1, 2):
        layout = OutputLayout(tmp_path / f"detail.shard-{k}-of-2.jsonl")
        accepted, rejected = ids[k]
        layout.samples.write_text(json.dumps({"id": sample_id(accepted), "image": "a.jpg"}) + "\n")
        layout.rejects.write_text(json.dumps({"id": sample_id(rejected), "image": "b.jpg", "reject_reasons": ["refusal"]}) + "\n")
        layout.runs.write_text(json.dumps({"shard": f"{k}/2", "images": 2}) + "\n")
    out = tmp_path / "merged" / "detail.jsonl"
    result = invoke("merge", *sorted(tmp_path.glob("detail.shard-*")), "--out", out)
    assert result.exit_code == 0, result.output
    assert "merged 2 file(s), shards 1/2, 2/2: 4 of 4 images done: 2 samples" in result.stdout and "2 rejects" in result.stdout
    assert "note: skipped 4 file(s)" in result.stderr and "--with-rejects" not in result.stderr
    assert len(OutputLayout(out).rejects.read_text().splitlines()) == 2
