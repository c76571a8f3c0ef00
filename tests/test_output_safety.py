"""Issue 9, generation side: a full disk stops the run with one error line (exit 2) and a rerun finishes; two runs
never write one output; a killed run's lock never blocks; several processes share a cache safely."""
from __future__ import annotations

import asyncio
import errno
import json
import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import datagen.engine.cache as cache_module
import datagen.outputs as outputs
from datagen.backends.base import Completion
from datagen.engine.cache import ResponseCache
from datagen.outputs import OutputLock, OutputLocked, OutputWriteError, lock_path
from datagen.sample import OutputLayout, sample_id
from engine_support import REPO, assert_user_error, datagen_here, ids_of, load_index, run_engine
from fake_openai_server import FakeOpenAIServer
from guards import HANG_GUARD_S, WAIT_GUARD_S

LIMIT = 16  # images per run: enough batches for a write to fail mid-run, few enough to stay fast


class FullDisk:
    """Stands in for the `os` module inside datagen.outputs: writes succeed until `room` bytes are used, then one
    write stores part of its data and fails with ENOSPC, as a real full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.failures = 0

    def write(self, fd: int, data) -> int:
        data = bytes(data)
        if len(data) <= self.room:
            self.room -= len(data)
            return os.write(fd, data)
        if self.room > 0:  # a short write first: the caller loops and then hits the error
            written = os.write(fd, data[: self.room])
            self.room = 0
            return written
        self.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(os, name)


def whole_valid_lines(path: Path) -> list[dict]:
    """Every line of an output parses and the file ends in a newline (or is empty)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends in half a line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def run_guarded(fn, guard_s: float = WAIT_GUARD_S):
    """Run `fn` in a thread and return (result, error); fail if it never returns (the hang of issue 9). The guard
    is a safety net against hanging the suite, not a timing assertion."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(guard_s)
    assert not thread.is_alive(), "the run hung after a write error"
    return box.get("result"), box.get("error")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(room=st.integers(min_value=0, max_value=12_000))
def test_disk_full_at_any_byte_stops_the_run_and_a_rerun_finishes_every_id_once(room, coco_root, tmp_path_factory,
                                                                               monkeypatch):
    folder = tmp_path_factory.mktemp("full")
    out = folder / "c.jsonl"
    layout = OutputLayout(out)
    expected = {sample_id(i) for i in load_index(coco_root).image_ids()[:LIMIT]}
    disk = FullDisk(room)
    with FakeOpenAIServer() as server:
        with monkeypatch.context() as patch:
            patch.setattr(outputs, "os", disk)
            stats, error = run_guarded(lambda: run_engine(server.base_url, out, coco_root, limit=LIMIT, concurrency=4,
                                                          cache_path=folder / "cache.sqlite"))
        if disk.failures == 0:  # the whole run fitted in `room`
            assert error is None and stats.accepted + stats.rejected == LIMIT
        else:
            assert isinstance(error, OutputWriteError), error
            assert str(error).startswith(f"cannot write {folder}") and "No space left on device" in str(error)
            assert "; free disk space" in str(error)
        written = whole_valid_lines(out) + whole_valid_lines(layout.rejects)
        assert len({r["id"] for r in written}) == len(written)
        assert not lock_path(out).exists()
        run_guarded(lambda: run_engine(server.base_url, out, coco_root, limit=LIMIT, concurrency=4,
                                       cache_path=folder / "cache.sqlite"))
    final = ids_of(out, layout.rejects)
    assert sorted(final) == sorted(expected)


class FullCacheConnection:
    """An SQLite connection whose commits fail with SQLITE_FULL after `commits` of them (a full disk under the cache)."""

    def __init__(self, real: sqlite3.Connection, state: dict) -> None:
        self._real = real
        self._state = state

    def execute(self, sql: str, *args):
        if sql.strip().upper() == "COMMIT":
            if self._state["commits"] <= 0:
                raise sqlite3.OperationalError("database or disk is full")
            self._state["commits"] -= 1
        return self._real.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def test_cache_full_stops_the_cli_run_with_one_line_exit_2_and_the_rerun_finishes(coco_root, tmp_path, monkeypatch):
    out, cache = tmp_path / "c.jsonl", tmp_path / "cache.sqlite"
    args = ["generate", "--split", "conversation", "--coco-root", str(coco_root), "--limit", str(LIMIT),
            "--backend", "openai", "--out", str(out), "--cache", str(cache), "--concurrency", "4"]
    real_connect = sqlite3.connect
    state = {"commits": 0}  # the first commit fails: how many batches a run makes depends on timing
    with FakeOpenAIServer() as server:
        with monkeypatch.context() as patch:
            patch.setattr(cache_module.sqlite3, "connect",
                          lambda *a, **k: FullCacheConnection(real_connect(*a, **k), state))
            proc, error = run_guarded(lambda: datagen_here(*args, "--base-url", server.base_url))
        assert error is None, error
        assert_user_error(proc, f"cannot write {cache}: database or disk is full; free disk space")
        # No output line without its completion in the cache (the cache is written first).
        assert whole_valid_lines(out) + whole_valid_lines(OutputLayout(out).rejects) == []
        again = datagen_here(*args, "--base-url", server.base_url)
    assert again.returncode == 0, again.stderr
    expected = {sample_id(i) for i in load_index(coco_root).image_ids()[:LIMIT]}
    assert sorted(ids_of(out, OutputLayout(out).rejects)) == sorted(expected)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs here (needs user namespaces or root)")
def test_generate_on_a_real_200k_filesystem_exits_2_and_finishes_after_space_is_freed(coco_root, tmp_path):
    """The issue's case: the output folder on a 200 KB tmpfs (in a private mount namespace, gone afterwards)."""
    mnt, keep = tmp_path / "mnt", tmp_path / "keep"
    mnt.mkdir()
    keep.mkdir()
    with FakeOpenAIServer() as server:
        gen = (f"{sys.executable} -m datagen generate --split conversation --coco-root {coco_root} --backend openai "
               f"--base-url {server.base_url} --out {mnt}/c.jsonl --concurrency 8")
        script = f"""
            mount -t tmpfs -o size=200k tmpfs {mnt} || exit 99
            {gen} > {keep}/first.out 2> {keep}/first.err; echo $? > {keep}/first.rc
            cp {mnt}/c.jsonl {mnt}/c.rejects.jsonl {keep}/ 2>/dev/null
            mount -o remount,size=20m {mnt}
            {gen} > {keep}/second.out 2> {keep}/second.err; echo $? > {keep}/second.rc
            cp {mnt}/c.jsonl {keep}/final.jsonl; cp {mnt}/c.rejects.jsonl {keep}/final.rejects.jsonl
            ls -a {mnt} > {keep}/listing
        """
        env = {**os.environ, "OPENAI_API_KEY": "sk-test", "PYTHONPATH": str(REPO)}
        subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, timeout=HANG_GUARD_S, check=True)
    first_err = [line for line in (keep / "first.err").read_text().splitlines() if line.strip()]
    assert (keep / "first.rc").read_text().strip() == "2", first_err
    assert len(first_err) == 1 and first_err[0].startswith(f"error: cannot write {mnt}/"), first_err
    # The sample files or the response cache, whichever filled the disk first.
    assert "No space left on device; free disk space" in first_err[0] or "disk is full; free disk space" in first_err[0]
    partial = whole_valid_lines(keep / "c.jsonl") + whole_valid_lines(keep / "c.rejects.jsonl")
    assert (keep / "second.rc").read_text().strip() == "0", (keep / "second.err").read_text()
    final = ids_of(keep / "final.jsonl", keep / "final.rejects.jsonl")
    expected = {sample_id(i) for i in load_index(coco_root).image_ids()}
    assert sorted(final) == sorted(expected) and len(partial) < len(expected)
    assert not any(name.endswith((".tmp", ".lock")) for name in (keep / "listing").read_text().split())


def _datagen_popen(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "datagen", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _wait_for(predicate, guard_s: float = WAIT_GUARD_S) -> None:
    deadline = time.monotonic() + guard_s
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def test_second_run_on_the_same_output_exits_2_naming_the_holder(coco_root, tmp_path):
    out = tmp_path / "c.jsonl"
    server = FakeOpenAIServer()
    gate = threading.Event()  # the first run's requests wait here until the second run has been refused
    answer, arrived = server.chat, threading.Event()

    async def gated_chat(request):
        arrived.set()
        while not gate.is_set():
            await asyncio.sleep(0.02)
        return await answer(request)

    server.chat = gated_chat
    with server:
        args = ["generate", "--split", "conversation", "--coco-root", str(coco_root), "--limit", "24",
                "--backend", "openai", "--base-url", server.base_url, "--out", str(out), "--concurrency", "2"]
        first = _datagen_popen(args)
        try:
            _wait_for(lambda: arrived.is_set() or first.poll() is not None)  # holding the lock, mid-run
            holder = outputs.read_lock_info(lock_path(out))
            second = _datagen_popen(args)
            _, second_err = second.communicate(timeout=HANG_GUARD_S)
            gate.set()
            first_out, first_err = first.communicate(timeout=HANG_GUARD_S)
        finally:
            gate.set()
            first.kill()
    assert holder == {"pid": first.pid, "host": socket.gethostname(), "started": holder["started"]}
    assert second.returncode == 2
    lines = [line for line in second_err.splitlines() if line.strip()]
    assert len(lines) == 1, second_err
    assert lines[0] == (f"error: {out} is being written by another run (pid {first.pid} on {socket.gethostname()}, "
                        f"started {holder['started']}); wait for that run to finish (or stop it), or write to another --out")
    assert first.returncode == 0, first_err
    final = ids_of(out, OutputLayout(out).rejects)
    assert len(final) == len(set(final)) == 24
    assert not lock_path(out).exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_file_from_a_dead_run_does_not_block(coco_root, tmp_path):
    out = tmp_path / "c.jsonl"
    lock_path(out).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                          "started": "2026-01-01T00:00:00Z"}))
    with FakeOpenAIServer() as server:
        proc = datagen_here("generate", "--split", "conversation", "--coco-root", str(coco_root), "--limit", "3",
                            "--backend", "openai", "--base-url", server.base_url, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(ids_of(out, OutputLayout(out).rejects)) == 3 and not lock_path(out).exists()


def _hold_lock(path: str, ready) -> None:
    with OutputLock(Path(path)):
        ready.set()
        time.sleep(WAIT_GUARD_S)  # until the test kills it (a multiprocessing Event would deadlock on a killed waiter)


def test_lock_is_exclusive_between_processes_and_free_after_the_holder_is_killed(tmp_path):
    out = tmp_path / "x.jsonl"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready))
    holder.start()
    try:
        assert ready.wait(WAIT_GUARD_S)
        with pytest.raises(OutputLocked, match=f"pid {holder.pid} on {socket.gethostname()}"):
            OutputLock(out).acquire()
        holder.kill()  # SIGKILL: no chance to clean up; the kernel drops the flock, the file stays
        holder.join(WAIT_GUARD_S)
        assert lock_path(out).exists()
        with OutputLock(out) as lock:
            assert lock.info["pid"] == os.getpid()
        assert not lock_path(out).exists()
    finally:
        holder.kill()


def test_lock_in_a_forked_child_does_not_outlive_the_parent(tmp_path):
    """The judge's worker process is forked while the run holds its lock: the child must not keep it."""
    out = tmp_path / "x.jsonl"
    with OutputLock(out):
        pid = os.fork()
        if pid == 0:  # child: the lock must already be closed here; try to take it from a fresh process view
            os._exit(0 if not outputs._HELD else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_flock_a_pid_file_guards_and_a_dead_holder_is_taken_over(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(outputs.fcntl, "flock", no_flock)
    out = tmp_path / "x.jsonl"
    lock_path(out).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "t0"}))
    with pytest.raises(OutputLocked, match=f"pid {os.getppid()} on {socket.gethostname()}, started t0"):
        OutputLock(out).acquire()
    lock_path(out).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "t0"}))
    with OutputLock(out) as lock:
        assert outputs.read_lock_info(lock.path)["pid"] == os.getpid()
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t0"}))
    with pytest.raises(OutputLocked, match="if that run is gone, delete"):
        OutputLock(out).acquire()


def _write_rows(path: str, worker: int, rows: int) -> None:
    cache = ResponseCache(Path(path))
    for start in range(0, rows, 10):
        cache.put_many([(f"w{worker}-{i}", "openai", "m", f"{i}:x", Completion(f"text {worker} {i}", "stop", 1, 1, "m"))
                        for i in range(start, start + 10)])
    cache.close()


def test_several_processes_write_one_cache_without_losing_a_row(tmp_path):
    path = tmp_path / "cache.sqlite"
    ctx = multiprocessing.get_context("fork")  # no threads run in this test; fork skips re-importing the suite
    workers = [ctx.Process(target=_write_rows, args=(str(path), w, 200)) for w in range(3)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(WAIT_GUARD_S)
    assert [proc.exitcode for proc in workers] == [0, 0, 0]
    cache = ResponseCache(path)
    try:
        assert cache.stats().entries == 600
        assert cache.get("w2-199").text == "text 2 199"
    finally:
        cache.close()


def test_output_path_that_is_a_folder_is_one_line_exit_2(coco_root, tmp_path):
    folder = tmp_path / "out.jsonl"
    folder.mkdir()
    proc = datagen_here("generate", "--split", "conversation", "--coco-root", str(coco_root), "--limit", "1",
                        "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--out", str(folder))
    assert_user_error(proc, f"--out {folder} is a folder")


def test_a_multi_split_run_stops_if_any_split_output_is_held(coco_root, tmp_path):
    """`generate --split A --split B --out-dir D` locks every split's output before it reads any of them."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "detail.jsonl"), ready))
    holder.start()
    try:
        assert ready.wait(WAIT_GUARD_S)
        proc = datagen_here("generate", "--split", "conversation", "--split", "detail", "--coco-root", str(coco_root),
                            "--limit", "2", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                            "--out-dir", str(tmp_path))
    finally:
        holder.kill()
        holder.join(WAIT_GUARD_S)
    assert_user_error(proc, f"{tmp_path / 'detail.jsonl'} is being written by another run (pid {holder.pid} on")
    assert not (tmp_path / "conversation.jsonl").exists() and not lock_path(tmp_path / "conversation.jsonl").exists()
