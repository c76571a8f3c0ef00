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


def _outcomes(out_dir, split):
    layout = OutputLayout(out_dir / f"{split}.jsonl")
    accepted = {r["id"]: r for r in map(json.loads, layout.samples.read_text().splitlines())}
    rejected = {r["id"]: r for r in map(json.loads, layout.rejects.read_text().splitlines())} if layout.rejects.exists() else {}
    return accepted, rejected


def test_best_of_n_keeps_a_passing_candidate_and_records_every_reason(coco_root, tmp_path):
    """One request per image with n=3 (OpenAI's `n`); where the first choice is a planted refusal, another choice is
    kept. Best-of-N accepts every image best-of-1 accepts, and more."""
    with FakeOpenAIServer(bad_first_choice_every=2) as server:
        for n in (1, 3):
            proc = datagen("generate", "--split", "conversation", "--split", "reasoning", "--coco-root", str(coco_root),
                           "--limit", "12", "--backend", "openai", "--base-url", server.base_url,
                           "--out-dir", str(tmp_path / f"n{n}"), "--candidates", str(n))
            assert proc.returncode == 0, proc.stderr
        assert server.state.count == 2 * 2 * 12  # one request per image and split, whatever n is
    for split in ("conversation", "reasoning"):
        one, one_rejected = _outcomes(tmp_path / "n1", split)
        three, three_rejected = _outcomes(tmp_path / "n3", split)
        assert one_rejected and set(one) < set(three)  # the planted refusals were rescued
        for record in three.values():
            meta = record["meta"]["candidates"]
            assert meta["n"] == 3 and len(meta["reasons"]) == 3 and meta["reasons"][meta["kept"]] == []
            assert all(r["meta"].get("candidates") is None for r in one.values())
        for image_id, record in three.items():
            if image_id in one_rejected:
                assert record["meta"]["candidates"]["reasons"][0] and record["meta"]["candidates"]["kept"] != 0


def test_candidates_on_ray_and_no_repeat_on_openai_are_refused(coco_root, tmp_path):
    ray = datagen("generate", "--split", "conversation", "--coco-root", str(coco_root), "--candidates", "2",
                  "--executor", "ray", "--out-dir", str(tmp_path))
    assert_user_error(ray, "--candidates runs on the local executor only")
    ngram = datagen("generate", "--split", "conversation", "--coco-root", str(coco_root), "--no-repeat-ngram-size", "3",
                    "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--out-dir", str(tmp_path))
    assert_user_error(ngram, "--no-repeat-ngram-size works with the local backend only")


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(max_size=30), min_size=1, max_size=5), tokens=st.lists(st.integers(0, 500), min_size=5, max_size=5))
def test_the_cache_returns_every_choice_in_order(tmp_path_factory, texts, tokens):
    from datagen.backends.base import Completion
    from datagen.engine.cache import ResponseCache

    choices = [Completion(t, "stop", 0, tokens[k], "m") for k, t in enumerate(texts)]
    first = Completion(texts[0], "stop", 17, tokens[0], "m", alternatives=tuple(choices[1:]))
    cache = ResponseCache(tmp_path_factory.mktemp("c") / "cache.sqlite")
    try:
        cache.put_many([("k1", "b", "m", "item", first), ("k10", "b", "m", "item2", Completion("x", "stop", 1, 1, "m"))])
        got = cache.get("k1")
        assert got == first and got.total_completion_tokens == sum(tokens[:len(texts)])
        assert cache.get("k10").alternatives == () and cache.get("k") is None
    finally:
        cache.close()
