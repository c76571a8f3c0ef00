"""The collector's settings during a run (datagen.engine.heap): raised and frozen for the run, as before afterwards."""
from __future__ import annotations

import asyncio
import gc

import pytest

from datagen.engine.config import EngineConfig
from datagen.engine.heap import GEN0_THRESHOLD, steady_heap
from datagen.engine.judging import ProcessJudge
from datagen.executors.local import run_local
from datagen.sample import OutputLayout


class CollectorProbe:
    """A judging task whose verdict is the collector's state in the process that judged."""

    def judge(self, subject, completion):
        return gc.get_threshold()[0], gc.get_freeze_count() > 0, gc.isenabled()


@pytest.fixture
def collector_settings():
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)
    gc.unfreeze()


@pytest.mark.parametrize("threshold", [(700, 10, 10), (100, 3, 7), (90_000, 10, 10), (0, 10, 10)])
def test_steady_heap_raises_and_restores(collector_settings, threshold):
    gc.set_threshold(*threshold)
    frozen = gc.get_freeze_count()
    with steady_heap():
        assert gc.get_threshold() == ((max(GEN0_THRESHOLD, threshold[0]) if threshold[0] else 0), *threshold[1:])
        assert gc.get_freeze_count() >= frozen
        garbage = []
        garbage.append(garbage)  # a cycle made during the run is still collectable
        del garbage
        assert gc.collect() >= 1
    assert gc.get_threshold() == threshold
    assert gc.get_freeze_count() == 0


def test_steady_heap_restores_after_an_error(collector_settings):
    with pytest.raises(RuntimeError), steady_heap():
        raise RuntimeError("boom")
    assert gc.get_threshold() == collector_settings
    assert gc.get_freeze_count() == 0


def test_judge_workers_collect_less_and_leave_the_inherited_heap_frozen(collector_settings):
    judge = ProcessJudge(CollectorProbe(), workers=2)
    try:
        verdicts = judge.judge_many([(None, None)] * 4)
    finally:
        judge.close()
    assert verdicts == [(GEN0_THRESHOLD, True, True)] * 4
    assert gc.get_threshold() == collector_settings  # the parent's settings are its own


def test_a_local_run_leaves_the_collector_as_it_found_it(tmp_path, collector_settings):
    class Empty:
        split = "conversation"
        gate = False

        def near_duplicate_gate(self, path):
            return None

    class NoBackend:
        name, model, preferred_concurrency, observe_headers = "none", "none-1", 1, None

    stats = asyncio.run(run_local(Empty(), OutputLayout(tmp_path / "out.jsonl"), NoBackend(), [], EngineConfig(), 1))
    assert stats.accepted == 0
    assert gc.get_threshold() == collector_settings
    assert gc.get_freeze_count() == 0
