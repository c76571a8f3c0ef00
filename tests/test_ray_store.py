"""The Ray workers' cache store: completions stored as they come, in group commits, and a chunk's lookup."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("ray", reason="the Ray executor needs the [ray] extra (make setup installs it)")

from datagen.backends.base import Completion  # noqa: E402
from datagen.engine.work import WorkItem  # noqa: E402
from datagen.errors import VisinstructError  # noqa: E402
from datagen.executors.ray_store import CacheSpec, FileStore, GroupCommit  # noqa: E402


# A hang guard, not a timing: the work is at most 30 rows with millisecond sleeps.
STUCK_GUARD_S = 60.0


class RecordingStore:
    """put_many that takes some time, records each batch it was given, and fails a batch holding a poisoned row."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.batches: list[list[tuple]] = []
        self.committed: set[str] = set()
        self.running = self.most_at_once = 0

    async def put_many(self, rows: list[tuple]) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            self.batches.append(list(rows))
            await asyncio.sleep(self.delays[len(self.batches) % len(self.delays)])
            if any(row[0].startswith("poison") for row in rows):
                raise VisinstructError("cannot write the response cache", "free disk")
            self.committed.update(row[0] for row in rows)
        finally:
            self.running -= 1

    async def get_many(self, keys: list[str]) -> dict[str, Completion]:
        return {key: Completion(key, "stop", 1, 1, "m") for key in keys if key in self.committed}


def row(key: str) -> tuple:
    return (key, "openai", "m", key, Completion(key, "stop", 1, 1, "m"))


@settings(max_examples=40, deadline=None)
@given(gaps=st.lists(st.sampled_from([0.0, 0.0, 0.001, 0.004]), min_size=1, max_size=30),
       poisoned=st.sets(st.integers(0, 29), max_size=3),
       delays=st.lists(st.sampled_from([0.0, 0.001, 0.003]), min_size=1, max_size=4))
def test_each_row_is_committed_once_before_its_put_returns_and_a_failed_commit_fails_its_rows(gaps, poisoned, delays):
    store = RecordingStore(delays)
    commits = GroupCommit(store, interval=0.002)
    keys = [("poison" if k in poisoned else "row") + f"-{k}" for k in range(len(gaps))]
    outcome: dict[str, str] = {}

    async def one(key: str, gap: float) -> None:
        await asyncio.sleep(gap)
        try:
            await commits.put(row(key))
        except VisinstructError:
            outcome[key] = "raised"
            return
        assert key in store.committed, "put returned before its row was committed"
        outcome[key] = "stored"

    async def main() -> None:
        work = asyncio.gather(*(one(key, sum(gaps[:k + 1])) for k, key in enumerate(keys)))
        try:  # a put left waiting forever (its row never committed) is a failure, not a hang
            await asyncio.wait_for(work, STUCK_GUARD_S)
        except asyncio.TimeoutError:
            raise AssertionError("a put never returned: its row was left uncommitted") from None

    asyncio.run(main())
    given_rows = [r[0] for batch in store.batches for r in batch]
    assert sorted(given_rows) == sorted(keys), "every row in exactly one commit"
    assert store.most_at_once == 1, "one commit at a time"
    failed = {r[0] for batch in store.batches if any(r[0].startswith("poison") for r in batch) for r in batch}
    assert outcome == {key: "raised" if key in failed else "stored" for key in keys}
    assert commits.commits == len(store.batches) and not commits.committing


def test_rows_that_arrive_together_share_one_commit_and_later_ones_the_next():
    store = RecordingStore([0.01])
    commits = GroupCommit(store, interval=0.005)

    async def main() -> None:
        await asyncio.gather(*(commits.put(row(f"a{k}")) for k in range(50)))
        await asyncio.gather(*(commits.put(row(f"b{k}")) for k in range(7)))

    asyncio.run(main())
    assert [len(batch) for batch in store.batches] == [50, 7]


def item(key: str, cached: Completion | None = None) -> WorkItem:
    return WorkItem(seq=0, prepared=None, key=key, cached=cached)


def test_a_chunk_run_again_finds_what_the_dead_worker_stored_in_the_file(tmp_path):
    """FileStore through GroupCommit: rows reach the SQLite file, and a chunk that Ray runs again after its worker
    died gets them attached (so they are not requested again); keys never stored, and items that carry their
    completion already, are left as they are."""
    spec = CacheSpec(str(tmp_path / "cache.sqlite"), node_id="here")
    commits = spec.store("here")
    assert isinstance(commits.store, FileStore)
    planned = Completion("from the plan", "stop", 1, 1, "m")

    async def main() -> list[WorkItem]:
        await asyncio.gather(*(commits.put(row(f"k{k}")) for k in range(5)))
        return await commits.attach_stored([item("k1"), item("never"), item("k4"), item("k2", planned)])

    again = asyncio.run(main())
    assert [(i.key, i.cached.text if i.cached else None) for i in again] == [
        ("k1", "k1"), ("never", None), ("k4", "k4"), ("k2", "from the plan")]
    with pytest.raises(VisinstructError, match="another node"):
        spec.store("elsewhere")
