"""The Batch API flow against the fake server's /files and /batches: submit, status, collect, resubmit."""
from __future__ import annotations

import json

from datagen.engine.batch_api import BatchState
from datagen.sample import OutputLayout, sample_id
from engine_support import assert_user_error, datagen, datagen_here, ids_of, load_index
from fake_openai_server import FakeOpenAIServer


def test_submit_status_collect_then_resubmit_the_failed_and_expired(coco_root, tmp_path):
    index = load_index(coco_root, "reasoning")
    ids = [sample_id(i) for i in index.image_ids()[:12]]
    fail, expire = {f"{ids[1]}:reasoning"}, {f"{ids[4]}:reasoning", f"{ids[7]}:reasoning"}
    out = tmp_path / "reasoning.jsonl"
    with FakeOpenAIServer(batch_fail=fail, batch_expire=expire, batch_polls=2) as server:
        common = ("--out", str(out))
        proc = datagen_here("batch", "submit", "--split", "reasoning", "--coco-root", str(coco_root), "--limit", "12",
                       "--base-url", server.base_url, *common)
        assert proc.returncode == 0, proc.stderr
        state = BatchState.load(OutputLayout(out).batch_state)
        assert len(state.batches) == 1 and state.batches[0].count == 12 and state.batches[0].batch_id
        lines = [json.loads(l) for l in open(state.batches[0].request_file)]
        assert {l["custom_id"] for l in lines} == {f"{i}:reasoning" for i in ids}
        assert lines[0]["url"] == "/v1/chat/completions" and lines[0]["body"]["model"] == "gpt-4o-mini"

        status = datagen_here("batch", "status", *common)
        assert status.returncode == 0 and "in_progress" in status.stdout
        # A second submit while the batch runs sends nothing new.
        again = datagen_here("batch", "submit", "--split", "reasoning", "--coco-root", str(coco_root), "--limit", "12",
                        "--base-url", server.base_url, *common)
        assert again.returncode == 0 and "nothing to submit" in again.stdout

        collected = datagen_here("batch", "collect", *common)
        assert collected.returncode == 0, collected.stderr
        assert "9 results, 3 to resubmit" in collected.stdout
        assert sorted(ids_of(out, OutputLayout(out).rejects)) == sorted(set(ids) - {ids[1], ids[4], ids[7]})
        resubmit = BatchState.load(OutputLayout(out).batch_state).batches[0].resubmit_file
        assert {json.loads(l)["custom_id"] for l in open(resubmit)} == fail | expire

        # Collect is idempotent; the resubmit file goes out as a new batch and completes the split.
        assert "0 accepted" in datagen_here("batch", "collect", *common).stdout
        server.batch_fail, server.batch_expire = set(), set()
        proc = datagen_here("batch", "submit", "--split", "reasoning", "--coco-root", str(coco_root), "--limit", "12",
                       "--base-url", server.base_url, "--requests", resubmit, *common)
        assert proc.returncode == 0, proc.stderr
        datagen_here("batch", "status", *common)
        final = datagen_here("batch", "collect", *common)
        assert final.returncode == 0 and "3 results, 0 to resubmit" in final.stdout
    every = ids_of(out, OutputLayout(out).rejects)
    assert len(every) == len(set(every)) == 12 and set(every) == set(ids)
    # Results went into the cache: a live run of the same settings now makes no request.
    with FakeOpenAIServer() as live:
        proc = datagen_here("generate", "--split", "reasoning", "--coco-root", str(coco_root), "--limit", "12",
                       "--backend", "openai", "--base-url", live.base_url, "--out", str(tmp_path / "live.jsonl"))
        assert proc.returncode == 0 and live.state.count == 0 and "12 from cache" in proc.stdout


def test_collect_without_state_is_a_user_error(tmp_path):
    assert_user_error(datagen("batch", "collect", "--out", str(tmp_path / "x.jsonl")), "no batch state")


def test_submit_with_wrong_key_keeps_the_request_file_for_a_rerun(coco_root, tmp_path):
    out = tmp_path / "reasoning.jsonl"
    with FakeOpenAIServer(api_key="sk-right") as server:
        proc = datagen("batch", "submit", "--split", "reasoning", "--coco-root", str(coco_root), "--limit", "3",
                       "--base-url", server.base_url, "--out", str(out), env={"OPENAI_API_KEY": "sk-wrong"})
        assert_user_error(proc, "401")
        state = BatchState.load(OutputLayout(out).batch_state)
        assert state.batches[0].status == "written" and (OutputLayout(out).batch_dir / "requests-001.jsonl").exists()
        proc = datagen_here("batch", "submit", "--split", "reasoning", "--coco-root", str(coco_root), "--limit", "3",
                       "--base-url", server.base_url, "--out", str(out), env={"OPENAI_API_KEY": "sk-right"})
        assert proc.returncode == 0, proc.stderr
        assert len(BatchState.load(OutputLayout(out).batch_state).batches) == 1 and len(server.state.batches) == 1


def test_submit_takes_generate_s_options_and_the_same_request_body(coco_root, tmp_path):
    """`batch submit` shares generate's option groups: --repetition-penalty, --model, split as a choice."""
    out = tmp_path / "detail.jsonl"
    proc = datagen_here("batch", "submit", "--split", "detail", "--coco-root", str(coco_root), "--limit", "2",
                        "--repetition-penalty", "1.1", "--model", "my-model", "--out", str(out), "--dry-run", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(l) for l in open(OutputLayout(out).batch_dir / "requests-001.jsonl")]
    assert len(lines) == 2
    assert all(l["body"]["repetition_penalty"] == 1.1 and l["body"]["model"] == "my-model" for l in lines)
    assert BatchState.load(OutputLayout(out).batch_state).model == "my-model"
    wrong = datagen_here("batch", "submit", "--split", "captions", "--coco-root", str(coco_root), "--out", str(out))
    assert wrong.returncode == 2 and "captions" in wrong.stderr
