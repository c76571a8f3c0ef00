"""`datagen generate --split A --split B`: one run (one backend, one model load) writes <out-dir>/<split>.jsonl per split,
with plain progress lines when stderr is not a terminal."""
from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from datagen.cli.progress import PlainProgress
from datagen.engine.work import RunStats
from datagen.sample import OutputLayout, sample_id
from engine_support import assert_user_error, datagen, ids_of, load_index
from fake_openai_server import FakeOpenAIServer

SPLITS = ("conversation", "detail", "reasoning")


def test_repeated_split_writes_each_split_to_the_out_dir(coco_root, tmp_path):
    out_dir = tmp_path / "out"
    expected = {sample_id(i) for i in load_index(coco_root).image_ids()[:3]}
    with FakeOpenAIServer() as server:
        args = ["generate", *[a for s in SPLITS for a in ("--split", s)], "--coco-root", str(coco_root), "--limit", "3",
                "--backend", "openai", "--base-url", server.base_url, "--out-dir", str(out_dir)]
        proc = datagen(*args)
        assert proc.returncode == 0, proc.stderr
        assert server.state.count == 3 * len(SPLITS)
        rerun = datagen(*args)
        assert server.state.count == 3 * len(SPLITS)  # nothing asked twice
    for split in SPLITS:
        layout = OutputLayout(out_dir / f"{split}.jsonl")
        ids = ids_of(layout.samples, layout.rejects)
        assert len(ids) == len(set(ids)) and set(ids) == expected, split
        assert all(json.loads(l).get("split", split) == split for l in layout.samples.read_text().splitlines())
        entries = [json.loads(l) for l in layout.runs.read_text().splitlines()]
        assert len(entries) == 1 and entries[0]["config"]["source"]["split"] == split
        assert entries[0]["stats"]["accepted"] + entries[0]["stats"]["rejected"] == 3
        # Summaries in the order the splits were given; a plain progress line per split when it finished.
        assert f"progress: {split} 3/3 done" in proc.stderr
        assert f"{split}: all 3 images already done" in rerun.stdout
    starts = [proc.stdout.index(f"{split}: ") for split in SPLITS]
    assert starts == sorted(starts)
    assert rerun.returncode == 0 and "model:" not in rerun.stdout


def test_out_with_several_splits_is_refused(coco_root, tmp_path):
    proc = datagen("generate", "--split", "conversation", "--split", "detail", "--coco-root", str(coco_root),
                   "--out", str(tmp_path / "x.jsonl"))
    assert_user_error(proc, "--out names one file but 2 splits")
    assert not (tmp_path / "x.jsonl").exists()


def test_a_bad_split_fails_before_anything_runs(coco_root, tmp_path):
    proc = datagen("generate", "--split", "conversation", "--split", "detail", "--coco-root", str(coco_root),
                   "--image-ids", "1", "--out-dir", str(tmp_path))
    assert_user_error(proc, "image id 1")
    assert not list(tmp_path.iterdir())


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(SPLITS), st.floats(0, 7)), min_size=1, max_size=40),
       interval=st.sampled_from([0.0, 5.0, 10.0]))
def test_plain_progress_prints_per_interval_and_once_at_the_end(steps, interval):
    """Each split: a line at most once per interval while it runs, exactly one line when it finishes, none after."""
    now = [0.0]
    totals = {split: 4 for split in SPLITS}
    stream = io.StringIO()
    progress = PlainProgress(totals, stream, interval_s=interval, clock=lambda: now[0])
    processed = dict.fromkeys(SPLITS, 0)
    printed: dict[str, list[tuple[float, int]]] = {split: [] for split in SPLITS}
    for split, advance in steps:
        now[0] += advance
        processed[split] = min(4, processed[split] + 1)
        before = stream.getvalue().count("\n")
        progress.update(split, RunStats(accepted=processed[split], prompt_tokens=10))
        if stream.getvalue().count("\n") > before:
            printed[split].append((now[0], processed[split]))
    lines = stream.getvalue().splitlines()
    assert all(l.startswith("progress: ") and l.endswith(" s") for l in lines)
    for split in SPLITS:
        times = [t for t, _ in printed[split]]
        finals = [t for t, done in printed[split] if done == 4]
        assert len(finals) == (1 if processed[split] == 4 else 0)
        running = [t for t, done in printed[split] if done < 4]
        assert all(b - a >= interval for a, b in zip([0.0, *running], running))
        assert sum(f"progress: {split} " in l for l in lines) == len(times)
