"""Crash safety: kill -9 mid-run, rerun the same command: every id once, no completion paid for twice."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from datagen.context import render_context
from datagen.sample import OutputLayout, sample_id
from engine_support import REPO, ids_of, load_index
from fake_openai_server import FakeOpenAIServer, prompt_digest
from guards import HANG_GUARD_S, WAIT_GUARD_S


def test_kill_9_then_rerun_finishes_with_the_same_ids_and_no_repeated_request(coco_root, tmp_path):
    index = load_index(coco_root, "conversation")
    all_ids = {sample_id(i) for i in index.image_ids()}
    digest_of = {sample_id(i): prompt_digest([{"content": render_context(index.record(i), with_boxes=False)}])
                 for i in index.image_ids()}
    out, cache = tmp_path / "conversation.jsonl", tmp_path / "cache.sqlite"
    concurrency = 4
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    with FakeOpenAIServer(latency_s=0.05) as server:
        args = [sys.executable, "-m", "datagen.cli", "generate", "--split", "conversation", "--coco-root", str(coco_root),
                "--backend", "openai", "--base-url", server.base_url, "--out", str(out), "--cache", str(cache),
                "--concurrency", str(concurrency)]
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT_GUARD_S
        while time.monotonic() < deadline and len(ids_of(out, OutputLayout(out).rejects)) < 20:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        written = set(ids_of(out, OutputLayout(out).rejects))
        with sqlite3.connect(cache) as db:
            cached = {row[0].split(":")[0] for row in db.execute("SELECT item FROM responses")}
        persisted = written | {sample_id(int(i)) for i in cached}
        assert 20 <= len(persisted) < len(all_ids), "the kill should land mid-run"
        before = server.state.count

        rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert rerun.returncode == 0, rerun.stderr
        again = [r["digest"] for r in server.state.requests[before:]]

    final = ids_of(out, OutputLayout(out).rejects)
    assert len(final) == len(set(final)) and set(final) == all_ids
    # Nothing persisted before the kill was requested again, and nothing was requested twice in the rerun.
    assert not {digest_of[i] for i in persisted} & set(again)
    assert len(again) == len(set(again)) == len(all_ids - persisted)
    # Only requests in flight at the kill (at most `concurrency`), or answered a moment before and still on
    # their way to the sink's next cache commit, were ever sent twice.
    repeated = [d for d, n in server.state.attempts.items() if n > 1]
    assert len(repeated) <= 2 * concurrency


def test_half_written_last_line_is_cut_and_redone(coco_root, tmp_path):
    from engine_support import run_engine

    out = tmp_path / "c.jsonl"
    with FakeOpenAIServer() as server:
        run_engine(server.base_url, out, coco_root, limit=4)
        lines = out.read_text().splitlines(keepends=True)
        out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a crash mid-write
        stats = run_engine(server.base_url, out, coco_root, limit=4)
    assert stats.skipped == 3 and stats.requests == 1
    assert sorted(ids_of(out)) == sorted(set(ids_of(out))) and len(ids_of(out)) == 4


def test_malformed_output_file_is_a_user_error_and_stays_untouched(coco_root, tmp_path):
    from engine_support import assert_user_error, datagen

    out = tmp_path / "c.jsonl"
    turns = '"conversations": [{"from": "human", "value": "<image>\\nQ?"}, {"from": "gpt", "value": "A."}]'
    out.write_text(f'{{"id": "000000000139", "image": "a.jpg", {turns}}}\nnot json\n'
                   f'{{"id": "000000000802", "image": "b.jpg", {turns}}}\n')
    before = out.read_bytes()
    with FakeOpenAIServer() as server:
        proc = datagen("generate", "--split", "conversation", "--coco-root", str(coco_root), "--limit", "3",
                       "--backend", "openai", "--base-url", server.base_url, "--out", str(out))
        assert server.state.count == 0
    assert_user_error(proc, "c.jsonl:2: not valid JSON")
    assert out.read_bytes() == before
