"""The Ray Data executor on a local Ray (2 CPUs, started once per test session) against the fake server."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from guards import HANG_GUARD_S, WAIT_GUARD_S

ray = pytest.importorskip("ray", reason="the Ray executor needs the [ray] extra (make setup installs it)")

from datagen.backends.base import SamplingParams  # noqa: E402
from datagen.backends.openai_backend import OpenAIBackend  # noqa: E402
from datagen.engine.config import EngineConfig  # noqa: E402
from datagen.executors.local import run_local  # noqa: E402
from datagen.errors import VisinstructError  # noqa: E402
from datagen.executors.ray_executor import BackendSpec, RayRun, RayTimings, WindowPlanner, run_ray  # noqa: E402
from datagen.prompts import load_prompt_set  # noqa: E402
from datagen.sample import OutputLayout, sample_id  # noqa: E402
from datagen.task import LlavaTask  # noqa: E402
from engine_support import MODEL, REPO, assert_user_error, datagen_here, ids_of, load_index  # noqa: E402
from fake_openai_server import FakeOpenAIServer, FaultPlan  # noqa: E402
import datagen.outputs as outputs  # noqa: E402
from datagen.outputs import OutputWriteError  # noqa: E402
from test_output_safety import FullDisk, whole_valid_lines  # noqa: E402

SPLIT = "conversation"


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for these tests (2 CPUs, as in CI); its address lets a CLI subprocess join it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def make_task(gate: bool = True, max_tokens: int = 300, backend: str = "openai") -> LlavaTask:
    return LlavaTask(SPLIT, load_prompt_set(None, SPLIT), SamplingParams(max_tokens=max_tokens),
                     provenance={"backend": backend}, gate=gate)


def engine_config(cache: Path | None, **overrides) -> EngineConfig:
    return EngineConfig(cache_path=cache, backoff_base_s=0.01, backoff_max_s=0.05, **overrides)


def ray_run(server: FakeOpenAIServer, out: Path, coco_root: Path, *, concurrency: int = 8, task: LlavaTask | None = None,
            cache: Path | None = None, window: int = 50_000, writer_only: bool = False, **overrides) -> RayRun:
    index = load_index(coco_root, SPLIT)
    spec = BackendSpec("openai", MODEL, server.base_url, timeout=60.0)
    return run_ray(task or make_task(), OutputLayout(out), spec, index.records(index.image_ids()),
                   engine_config(cache, **overrides), concurrency, window=window, writer_only=writer_only)


def records_by_id(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {row["id"]: row for row in rows}


def cached_ids(cache: Path) -> set[str]:
    """The sample ids whose completions are in the cache file (empty while it is being created)."""
    if not cache.exists():
        return set()
    try:
        with sqlite3.connect(cache) as db:
            return {sample_id(int(row[0].split(":")[0])) for row in db.execute("SELECT item FROM responses")}
    except sqlite3.OperationalError:  # the writer has created the file but not its table yet
        return set()


def test_faults_every_id_exactly_once_across_accepted_rejected_and_failures(ray_address, coco_root, tmp_path):
    all_ids = {sample_id(i) for i in load_index(coco_root, SPLIT).image_ids()}
    out = tmp_path / "c.jsonl"
    layout = OutputLayout(out)
    plan = FaultPlan(rates={"429": 0.1, "500": 0.1, "drop": 0.1, "truncated": 0.1}, seed=3, retry_after_s=0.01)
    with FakeOpenAIServer(faults=plan) as server:
        first = ray_run(server, out, coco_root, cache=tmp_path / "cache.sqlite", max_retries=1)
        faults = dict(server.state.faults)
        failed = [json.loads(line)["id"] for line in layout.failures.read_text().splitlines()] if first.stats.failed else []
        written = ids_of(out, layout.rejects)
        assert len(written + failed) == len(set(written + failed)) == len(all_ids)
        assert set(written + failed) == all_ids
        assert first.stats.failed == len(failed) > 0 and first.stats.retries > 0
        assert first.stats.requests == server.state.count
        assert {"429", "500", "drop", "truncated"} <= set(faults)
        # The rerun retries exactly the failures; then every id is written once.
        before = server.state.count
        second = ray_run(server, out, coco_root, cache=tmp_path / "cache.sqlite", max_retries=8)
    assert second.stats.skipped == len(all_ids) - len(failed)
    assert second.stats.requests == server.state.count - before
    final = ids_of(out, layout.rejects)
    assert len(final) == len(set(final)) and set(final) == all_ids


def test_ray_and_local_write_the_same_samples_and_a_cached_rerun_sends_nothing(ray_address, coco_root, tmp_path):
    index = load_index(coco_root, SPLIT)
    cache = tmp_path / "cache.sqlite"
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    with FakeOpenAIServer() as server:
        async def local() -> None:
            backend = OpenAIBackend(model=MODEL, base_url=server.base_url, api_key="sk-test", timeout=60.0, concurrency=8)
            try:
                await run_local(make_task(), OutputLayout(local_out), backend, index.records(index.image_ids()),
                                engine_config(cache), 8)
            finally:
                await backend.aclose()

        asyncio.run(local())
        paid = server.state.count
        assert paid == len(index.image_ids())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = ray_run(server, ray_out, coco_root, cache=cache, window=40)  # two windows: the order carries across
        assert server.state.count == paid, "a run whose completions are all cached sends nothing"
    # No Ray API the run uses is deprecated (per-call remote args go in Ray 2.64).
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning) and "/datagen/" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert run.stats.cache_hits == paid and run.stats.requests == 0
    for name in ("samples", "rejects"):
        local_rows = records_by_id(getattr(OutputLayout(local_out), name))
        ray_rows = records_by_id(getattr(OutputLayout(ray_out), name))
        assert local_rows == ray_rows, name
    assert records_by_id(local_out), "some samples are accepted"


@pytest.mark.parametrize("writer_only", [False, True], ids=["file-on-the-drivers-node", "writer-actor"])
def test_workers_store_every_fresh_completion_before_handing_it_on(ray_address, coco_root, tmp_path, writer_only):
    """Workers on the driver's node write the cache file themselves; workers elsewhere go through the writer
    actor (`writer_only` takes that path here). Either way every completion is in the cache when the run ends,
    and a rerun on a fresh output sends nothing."""
    all_ids = {sample_id(i) for i in load_index(coco_root, SPLIT).image_ids()}
    cache = tmp_path / "cache.sqlite"
    with FakeOpenAIServer() as server:
        first = ray_run(server, tmp_path / "a.jsonl", coco_root, cache=cache, writer_only=writer_only)
        assert cached_ids(cache) == all_ids and first.stats.requests == server.state.count == len(all_ids)
        again = ray_run(server, tmp_path / "b.jsonl", coco_root, cache=cache, writer_only=writer_only)
        assert server.state.count == len(all_ids) and again.stats.cache_hits == len(all_ids)
    assert records_by_id(tmp_path / "a.jsonl") == records_by_id(tmp_path / "b.jsonl")


def test_rpm_and_budget_hold_for_the_whole_job_not_per_worker(ray_address, coco_root, tmp_path):
    out = tmp_path / "c.jsonl"
    rpm, budget = 120.0, 0.0025  # 2 requests/s for the job; the budget pays for about a dozen requests
    with FakeOpenAIServer() as server:
        run = ray_run(server, out, coco_root, concurrency=8, rpm=rpm, budget_usd=budget)
        arrivals = sorted(r["t"] for r in server.state.requests)
    assert run.timings.workers == 2
    stats = run.stats
    assert stats.budget_stopped > 0 and stats.cost_usd <= budget
    assert stats.accepted + stats.rejected == len(arrivals) == stats.requests
    # One bucket for the job: after a one-second burst, at most rpm/60 starts per second, whichever worker asks.
    # (Two per-worker buckets would fit the same requests into half the time.)
    burst = rpm / 60
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - burst - 1) / (rpm / 60) * 0.9


def test_kill_9_of_the_driver_then_rerun_pays_again_only_for_requests_in_flight(ray_address, coco_root, tmp_path):
    index = load_index(coco_root, SPLIT)
    all_ids = {sample_id(i) for i in index.image_ids()}
    out, cache = tmp_path / "conversation.jsonl", tmp_path / "cache.sqlite"
    layout = OutputLayout(out)
    concurrency = 4
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}

    with FakeOpenAIServer(latency_s=0.2) as server:
        args = [sys.executable, "-m", "datagen.cli", "generate", "--split", SPLIT, "--coco-root", str(coco_root),
                "--backend", "openai", "--base-url", server.base_url, "--out", str(out), "--cache", str(cache),
                "--concurrency", str(concurrency), "--executor", "ray", "--ray-address", ray_address]
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.monotonic() + WAIT_GUARD_S  # a hang guard far above the worst case, not a timing
        while time.monotonic() < deadline and proc.poll() is None and len(cached_ids(cache)) < 20:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        killed_at = time.monotonic()
        time.sleep(1.0)  # the cluster notices the driver's death and stops its workers
        persisted = set(ids_of(out, layout.rejects)) | cached_ids(cache)
        assert 20 <= len(persisted) < len(all_ids), "the kill should land mid-run"
        before = server.state.count
        late = [r for r in server.state.requests[:before] if r["t"] > killed_at]

        rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        again = [r["digest"] for r in server.state.requests[before:]]

    final = ids_of(out, layout.rejects)
    assert len(final) == len(set(final)) and set(final) == all_ids
    assert len(again) == len(set(again)) == len(all_ids - persisted), "the rerun asked once for each missing id only"
    repeated = [d for d, n in server.state.attempts.items() if n > 1]
    # Paid twice: only requests in flight at the kill: at most `concurrency` sent, plus those answered in the last
    # commit interval (workers store each completion as it comes, in group commits of ~50 ms).
    # Workers on the driver's node check it runs before each request: what still arrives after the kill was on its
    # way already, one per open slot at most (--concurrency is shared among the workers, rounded up per worker).
    assert len(late) <= 2 * concurrency, late
    assert len(repeated) <= 2 * concurrency, len(repeated)


def test_ray_flags_are_checked_before_anything_runs(coco_root):
    proc = datagen_here("generate", "--split", SPLIT, "--coco-root", str(coco_root), "--ray-address", "auto",
                        "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1")
    assert_user_error(proc, "--ray-address needs --executor ray")
    proc = datagen_here("generate", "--split", SPLIT, "--coco-root", str(coco_root), "--backend", "vllm", "--model", "m")
    assert_user_error(proc, "--backend vllm runs only on Ray")


def test_the_driver_maps_the_index_and_each_worker_reports_its_peak_memory(ray_address, coco_root, tmp_path,
                                                                          monkeypatch):
    """`coco index` ahead of the job; then the Ray driver opens the mapped index and parses no annotation JSON
    (the reader is made to fail), and the run reports every LLM-stage worker's peak RSS."""
    import datagen.coco as coco

    env = {"VISINSTRUCT_INDEX_DIR": str(tmp_path / "idx")}
    built = datagen_here("coco", "index", "--coco-root", str(coco_root), "--coco-split", "val2017", env=env)
    assert built.returncode == 0 and "index built" in built.stdout, built.stderr

    def no_json(*args, **kwargs):
        raise AssertionError("the annotation JSON was read")

    monkeypatch.setattr(coco, "read_annotations", no_json)
    out = tmp_path / "c.jsonl"
    with FakeOpenAIServer() as server:
        proc = datagen_here("generate", "--split", SPLIT, "--coco-root", str(coco_root), "--limit", "24",
                            "--backend", "openai", "--base-url", server.base_url, "--model", MODEL, "--out", str(out),
                            "--no-cache", "--concurrency", "8", "--executor", "ray", "--ray-address", ray_address, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(ids_of(out, OutputLayout(out).rejects)) == 24
    peak = [line for line in proc.stdout.splitlines() if line.startswith("ray: ")]
    assert peak and "peak RSS per worker up to" in peak[0], proc.stdout
    worker_mb = float(peak[0].rsplit("up to ", 1)[1].split()[0])
    assert 0 < worker_mb < 400, peak[0]  # the bound; a worker holds chunks of records, never the annotations


def engine_workers_of_this_cluster() -> list[int]:
    """Pids of the LLM-stage workers of the Ray this test process started (their ancestor is this process)."""
    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::MapWorker(MapBatches(EngineStage))"):
            pid = ancestor = int(entry.name)
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = parent(ancestor)
            if ancestor == os.getpid():
                found.append(pid)
    return found


def test_a_worker_killed_mid_run_is_replaced_and_every_id_is_written_once(ray_address, coco_root, tmp_path):
    all_ids = {sample_id(i) for i in load_index(coco_root, SPLIT).image_ids()}
    out, cache = tmp_path / "c.jsonl", tmp_path / "cache.sqlite"
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + WAIT_GUARD_S  # a hang guard far above the worst case, not a timing
        while time.monotonic() < deadline and not killed:
            if len(cached_ids(cache)) >= 8:  # the pool is running: a chunk is stored
                workers = engine_workers_of_this_cluster()
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
                    return
            time.sleep(0.05)

    with FakeOpenAIServer(latency_s=0.1) as server:
        killer = threading.Thread(target=kill_one_worker, daemon=True)
        killer.start()
        run = ray_run(server, out, coco_root, concurrency=4, cache=cache)
        killer.join(10)
    assert killed, "a worker was killed mid-run"
    final = ids_of(out, OutputLayout(out).rejects)
    assert len(final) == len(set(final)) and set(final) == all_ids and run.stats.failed == 0
    repeated = [d for d, n in server.state.attempts.items() if n > 1]
    print('REPEATED-WORKER', len(repeated))
    # Asked twice: only the killed worker's requests in flight, and the completions it had not committed yet (one
    # commit interval's); its replacement runs the dead worker's chunks again but finds the stored completions.
    # Before, the whole chunks were asked again (up to 4 + 8 * 2 here). The bound leaves room for a commit that a
    # loaded machine delays.
    assert len(repeated) <= 2 * 4, len(repeated)


@pytest.mark.slow
def test_local_backend_runs_the_embedded_model_in_cpu_workers(ray_address, coco_root, tmp_path):
    index = load_index(coco_root, SPLIT)
    ids = index.image_ids()[:2]
    out = tmp_path / "c.jsonl"
    spec = BackendSpec("local", "smollm2-135m-instruct", batch_size=2)
    # A few tokens per sample: the test is about the workers and the files, not about the samples' quality.
    run = run_ray(make_task(max_tokens=24, backend="local"), OutputLayout(out), spec, index.records(ids), engine_config(tmp_path / "cache.sqlite"), 2)
    stats = run.stats
    assert stats.accepted + stats.rejected == 2 and stats.failed == 0 and stats.requests == 2
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0 and stats.cost_usd == 0.0
    assert sorted(ids_of(out, OutputLayout(out).rejects)) == [sample_id(i) for i in ids]


def test_disk_full_on_the_driver_stops_the_ray_run_and_the_rerun_finishes(ray_address, coco_root, tmp_path, monkeypatch):
    """Issue 9: a write error in the driver's sink ends the Ray run with OutputWriteError (and Ray's actors go
    down); every output line is whole, and a rerun on free disk completes every id exactly once."""
    out, cache = tmp_path / "c.jsonl", tmp_path / "cache.sqlite"
    with FakeOpenAIServer() as server:
        with monkeypatch.context() as patch:
            patch.setattr(outputs, "os", FullDisk(4000))
            with pytest.raises(OutputWriteError, match=f"cannot write {tmp_path}.*No space left on device; free disk"):
                ray_run(server, out, coco_root, cache=cache)
        written = whole_valid_lines(out) + whole_valid_lines(OutputLayout(out).rejects)
        assert len(written) < len(load_index(coco_root, SPLIT).image_ids())
        ray_run(server, out, coco_root, cache=cache)
    final = ids_of(out, OutputLayout(out).rejects)
    assert sorted(final) == sorted({sample_id(i) for i in load_index(coco_root, SPLIT).image_ids()})


def kill_to_zombie(proc: subprocess.Popen) -> None:
    """SIGKILL a child and wait (not reaping it) until the kernel has made it a zombie: /proc shows no start time."""
    from datagen.executors.ray_items import _process_start

    proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + WAIT_GUARD_S  # a hang guard only
    while time.monotonic() < deadline and _process_start(proc.pid) is not None:
        time.sleep(0.01)


def test_workers_see_a_killed_driver_at_once_and_a_new_process_on_its_pid_is_not_it():
    """DriverProcess.alive: true while the process runs; false once it is killed (a zombie, not yet reaped) and
    once it is reaped; a record with another start time (a later process given the same pid) is not alive."""
    from datagen.executors.ray_items import DriverProcess, _process_start

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        driver = DriverProcess("node-a", proc.pid, _process_start(proc.pid))
        assert driver.started is not None and driver.alive()
        assert driver.watch_from("node-a") and not driver.watch_from("node-b")
        assert not DriverProcess("node-a", proc.pid, str(int(driver.started) + 1)).alive()
        kill_to_zombie(proc)
        assert not driver.alive(), "killed and not yet reaped"
    finally:
        proc.kill()
        proc.wait()
    assert not driver.alive(), "reaped"
    me = DriverProcess.this_process("n")
    assert me.pid == os.getpid() and me.alive()


def test_a_workers_driver_watch_agrees_with_proc_killed_zombie_reaped_and_another_start_time():
    """DriverWatch (a pidfd where there is one) answers as DriverProcess.alive does at every stage."""
    from datagen.executors.ray_items import DriverProcess, _process_start

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        driver = DriverProcess("node-a", proc.pid, _process_start(proc.pid))
        watch = driver.watch()
        assert watch.alive() and watch.alive(), "asked twice: still running"
        assert not DriverProcess("node-a", proc.pid, str(int(driver.started) + 1)).watch().alive()
        kill_to_zombie(proc)
        assert not watch.alive(), "killed and not yet reaped"
    finally:
        proc.kill()
        proc.wait()
    assert not watch.alive() and not driver.watch().alive(), "reaped"
    assert DriverProcess.this_process("n").watch().alive()


class ThreadNoting:
    """A RequestPlanner stand-in that notes the thread of each call (SQLite connections are bound to one)."""

    def __init__(self) -> None:
        self.threads: list[tuple[str, int]] = []

    def open(self) -> None:
        self.threads.append(("open", threading.get_ident()))

    def plan(self, records):
        for record in records:
            self.threads.append(("plan", threading.get_ident()))
            yield record

    def close(self) -> None:
        self.threads.append(("close", threading.get_ident()))


def test_the_first_window_is_planned_before_it_is_asked_for_and_all_planning_runs_in_one_thread():
    planner, started = ThreadNoting(), threading.Event()

    def records():
        started.set()
        yield from range(10)

    planning = WindowPlanner(planner, records(), 4, RayTimings())
    assert started.wait(WAIT_GUARD_S), "the first window is planned while the caller does something else (Ray starts)"
    assert [planning.take() for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], []]
    planning.close()
    planning.close()  # a second close does nothing
    assert [name for name, _ in planner.threads] == ["open"] + ["plan"] * 10 + ["close"]
    assert len({ident for _, ident in planner.threads}) == 1 and planner.threads[0][1] != threading.get_ident()


def test_a_planning_error_reaches_the_caller_and_the_planner_is_still_closed():
    planner = ThreadNoting()

    def records():
        yield 1
        raise VisinstructError("record 2 is malformed", "fix the index")

    planning = WindowPlanner(planner, records(), 4, RayTimings())
    with pytest.raises(VisinstructError, match="record 2 is malformed"):
        planning.take()
    planning.close()
    assert planner.threads[-1][0] == "close"
