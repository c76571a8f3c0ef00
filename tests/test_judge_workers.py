"""The judge worker processes (datagen.engine.judging.ProcessJudge): order, failures, and their lifetime."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datagen.engine.judging import JudgeWorkerError, ProcessJudge
from datagen.errors import VisinstructError
from datagen.executors.ray_items import _process_start
from guards import WAIT_GUARD_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Echo:
    """A judging task whose verdict names the pair and the process that judged it."""

    def judge(self, subject, completion):
        if subject == "boom":
            raise ValueError("a bug in the task")
        if subject == "die":
            os._exit(3)
        return subject, completion, os.getpid()


@pytest.fixture(scope="module")
def judge():
    pool = ProcessJudge(Echo(), workers=3)
    yield pool
    pool.close()


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 10**6), max_size=9), min_size=1, max_size=8),
       collect=st.randoms(use_true_random=False))
def test_every_batch_comes_back_in_its_order_whatever_order_it_is_collected_in(judge, batches, collect):
    pending = [(batch, judge.submit([(n, -n) for n in batch])) for batch in batches]
    order = list(range(len(pending)))
    collect.shuffle(order)
    for k in order:
        batch, verdicts = pending[k]
        got = verdicts.result()
        assert [(s, c) for s, c, _ in got] == [(n, -n) for n in batch]
        assert all(pid != os.getpid() for _, _, pid in got)  # judged in the workers, not here
    assert all(verdicts.done() for _, verdicts in pending)


def test_a_batch_is_shared_by_the_workers(judge):
    pids = {pid for _, _, pid in judge.judge_many([(n, n) for n in range(9)])}
    assert len(pids) == 3


def test_a_bug_in_the_task_is_raised_here_with_where_it_happened_and_the_workers_go_on(judge):
    with pytest.raises(RuntimeError, match="ValueError: a bug in the task") as info:
        judge.judge_many([("boom", 1)])
    assert "in judge" in str(info.value)  # the worker's traceback names the task's frame
    assert judge.judge_many([(1, 2)])[0][:2] == (1, 2)


def test_a_worker_that_dies_is_a_user_facing_error_not_a_hang():
    pool = ProcessJudge(Echo(), workers=2)
    try:
        with pytest.raises(JudgeWorkerError, match="exit code 3") as info:
            pool.judge_many([("die", 0), (1, 1)])
        assert isinstance(info.value, VisinstructError) and "rerun" in str(info.value)
    finally:
        pool.close()


def test_a_worker_killed_between_batches_is_that_error_when_the_next_batch_goes_out():
    pool = ProcessJudge(Echo(), workers=2)
    try:
        pool.judge_many([(1, 1), (2, 2)])
        victim = pool._pool[1].process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(WAIT_GUARD_S)
        with pytest.raises(JudgeWorkerError, match="exit code -9"):  # not an OSError, which reads as a disk error
            pool.judge_many([(n, n) for n in range(4)])
    finally:
        pool.close()


def _workers_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    return _process_start(pid) is None  # exited: a zombie not yet reaped, or reaped


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_workers_exit_when_their_parent_is_killed(how):
    """Killed with -9 (or by the OOM killer), a run must not leave its judge processes behind, however many pools."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from test_judge_workers import Echo
        from datagen.engine.judging import ProcessJudge
        judge = ProcessJudge(Echo(), workers=3)
        other = ProcessJudge(Echo(), workers=2)  # a second pool (generate makes one per split) forks after it
        judge.judge_many([(1, 1), (2, 2), (3, 3)])
        other.judge_many([(1, 1), (2, 2)])
        print("ready", flush=True)
        time.sleep(3600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = _workers_of(parent.pid)
        assert len(workers) == 5
        parent.send_signal(how)
        parent.wait(WAIT_GUARD_S)
        deadline = time.monotonic() + WAIT_GUARD_S
        while time.monotonic() < deadline and not all(_gone(pid) for pid in workers):
            time.sleep(0.01)
        assert all(_gone(pid) for pid in workers)
    finally:
        parent.kill()
        parent.wait()


def test_ctrl_c_is_left_to_the_parent():
    pool = ProcessJudge(Echo(), workers=2)
    try:
        pool.judge_many([(1, 1), (2, 2)])  # both workers are up and serving
        for worker in pool._pool:
            os.kill(worker.process.pid, signal.SIGINT)
        assert [s for s, _, _ in pool.judge_many([(n, n) for n in range(4)])] == [0, 1, 2, 3]
    finally:
        pool.close()


def test_a_run_whose_judge_worker_dies_stops_with_that_error_and_keeps_what_it_wrote(tmp_path, coco_root, prompts_dir):
    import asyncio

    from datagen.backends.base import SamplingParams
    from datagen.coco import CocoIndex
    from datagen.engine.config import EngineConfig
    from datagen.executors.local import run_local
    from datagen.jsonl import iter_jsonl
    from datagen.prompts import load_prompt_set
    from datagen.sample import OutputLayout
    from datagen.task import LlavaTask
    from test_task_engine import ORIGINAL, OTHER, ScriptedBackend

    index = CocoIndex(coco_root, "val2017", with_instances=False)
    ids = index.image_ids()[:40]
    doomed = ids[-1]

    class DyingTask(LlavaTask):
        def judge(self, prepared, completion):
            if prepared.record.id == doomed:
                os._exit(9)  # what the OOM killer leaves behind
            return super().judge(prepared, completion)

    task = DyingTask("conversation", load_prompt_set(prompts_dir, "conversation"), SamplingParams(),
                     provenance={"backend": "scripted"}, coco_available=False)
    texts = {i: [ORIGINAL, OTHER][k % 2] for k, i in enumerate(ids)}
    layout = OutputLayout(tmp_path / "c.jsonl")
    with pytest.raises(JudgeWorkerError, match="exit code 9"):
        asyncio.run(run_local(task, layout, ScriptedBackend(texts), index.records(ids), EngineConfig(), 4,
                              judge=ProcessJudge(task, workers=2)))
    written = [rec["id"] for path in (layout.samples, layout.rejects) if path.exists() for rec in iter_jsonl(path)]
    assert len(written) == len(set(written)) and str(doomed).zfill(12) not in written  # whole lines, no duplicates
