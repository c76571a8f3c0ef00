"""The Ray workers' way into the job's response cache: one SQLite file on the driver's node.

    worker on the driver's node   FileStore   the file itself, from a thread of its own
    worker on another node        WriterStore through the job's `CacheWriter` actor, pinned to the driver's node

Both are used through `GroupCommit`: a worker stores each fresh completion as it arrives, and rows arriving
while a commit runs go into the next one. So a crash loses, beyond the requests in flight, only the completions
of the last commit interval, however large the chunks Ray Data hands the worker; and a chunk that Ray runs again
after its worker died finds the completions already stored (`attach_stored`) rather than asking for them again.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray  # this module is the optional [ray] extra's, as is ray_executor

from datagen.backends.base import Completion
from datagen.engine.cache import ResponseCache
from datagen.engine.work import WorkItem
from datagen.errors import VisinstructError

Row = tuple[str, str, str, str, Completion]  # (key, backend, model, item, completion), as ResponseCache stores it

# How long rows gather before a commit, once the previous commit is done. What a commit costs is mostly getting
# there: on the dev box a hop to the store thread took ~80 µs of CPU, a one-row SQLite commit ~40 µs, each further
# row 12-17 µs (workers on other nodes make a round trip to the writer actor instead). A commit per completion
# would add ~0.12 ms to each; at 50 ms a worker makes at most 20 a second (bench/RESULTS.md, issue 8, sixth session). A crash loses at most this interval's completions (and the commit
# under way), beyond the requests in flight.
COMMIT_EVERY_S = 0.05


class CacheWriter:
    """Stores fresh completions into the run's SQLite cache, on the driver's node: as an actor for other nodes'
    workers, in place (`FileStore`) for the workers beside the driver."""

    def __init__(self, path: str) -> None:
        self.cache = ResponseCache(Path(path))

    def put_many(self, rows: list[Row]) -> int:
        self.cache.put_many(rows)
        return len(rows)

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        return self.cache.get_many(keys)

    def close(self) -> None:
        self.cache.close()


@dataclass(frozen=True)
class CacheSpec:
    """Where a job's fresh completions are stored: its SQLite cache file on the driver's node, and the
    `CacheWriter` actor there for workers on other nodes (None on the one-machine cluster a job starts itself)."""

    path: str
    node_id: str
    writer: Any | None = None
    writer_only: bool = False  # every worker through the writer, the driver's node's too

    def store(self, node_id: str) -> "GroupCommit":
        """A worker's way to the cache: the file itself on the driver's node, else the writer actor."""
        if self.writer is not None and (self.writer_only or node_id != self.node_id):
            return GroupCommit(WriterStore(self.writer))
        if node_id != self.node_id:
            raise VisinstructError("a Ray worker runs on another node than the driver, and the job has no cache "
                                   "writer there", "rerun: the job starts one when the cluster has other nodes")
        return GroupCommit(FileStore(self.path))


class FileStore:
    """A worker on the driver's node writes the cache file itself (SQLite's lock orders the writers), from a
    thread of its own that holds the connection, so the event loop goes on serving requests during a commit.
    Against a round trip to the writer actor per commit this saves the actor's process the work (bench/RESULTS.md,
    issue 8, fourth session)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="visinstruct-cache")
        self.writer: CacheWriter | None = None  # the actor's class, used in place, opened in the thread

    def _open(self) -> CacheWriter:
        if self.writer is None:
            self.writer = CacheWriter(self.path)
        return self.writer

    async def put_many(self, rows: list[Row]) -> None:
        await asyncio.get_running_loop().run_in_executor(self.thread, lambda: self._open().put_many(rows))

    async def get_many(self, keys: list[str]) -> dict[str, Completion]:
        return await asyncio.get_running_loop().run_in_executor(self.thread, lambda: self._open().get_many(keys))


class WriterStore:
    """A worker on another node stores through the job's `CacheWriter` actor; its errors arrive as raised there."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    async def _call(self, method: Any, *args: Any) -> Any:
        try:
            return await method.remote(*args)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, VisinstructError):
                raise exc.cause from None
            raise

    async def put_many(self, rows: list[Row]) -> None:
        await self._call(self.writer.put_many, rows)

    async def get_many(self, keys: list[str]) -> dict[str, Completion]:
        return await self._call(self.writer.get_many, keys)


class GroupCommit:
    """Rows stored as they arrive, in group commits: one commit at a time, the rows that arrive meanwhile (and in
    `interval` seconds after it) in the next. `put` returns once its row is committed and raises what the commit
    raised; a row is never reported stored before it is.

    `store` is a FileStore or WriterStore (anything with async `put_many(rows)` and `get_many(keys)`).
    """

    def __init__(self, store: Any, interval: float = COMMIT_EVERY_S) -> None:
        self.store = store
        self.interval = interval
        self.pending: list[Row] = []
        self.committed: asyncio.Future | None = None  # resolved when the pending rows are committed
        self.committing = False
        self.commits = 0

    async def put(self, row: Row) -> None:
        if self.committed is None:
            self.committed = asyncio.get_running_loop().create_future()
        self.pending.append(row)
        committed = self.committed
        if not self.committing:
            self.committing = True
            asyncio.get_running_loop().create_task(self._commit_pending())
        await asyncio.shield(committed)  # a cancelled caller leaves the commit to the others waiting on it

    async def _commit_pending(self) -> None:
        try:
            while self.pending:
                await asyncio.sleep(self.interval)  # rows gather: fewer, larger commits
                rows, committed = self.pending, self.committed
                self.pending, self.committed = [], None
                try:
                    await self.store.put_many(rows)
                except Exception as exc:
                    committed.set_exception(exc)
                except BaseException:  # cancelled: the worker is going down
                    committed.cancel()
                    raise
                else:
                    committed.set_result(None)
                self.commits += 1
        finally:
            self.committing = False

    async def attach_stored(self, items: list[WorkItem]) -> list[WorkItem]:
        """The items, each with its completion attached if the cache has one: Ray runs a dead worker's chunks
        again, and that worker stored each completion as it came. One query per chunk (which, on a chunk's first
        run, finds none, as the driver looked the items up while planning)."""
        keys = [item.key for item in items if item.cached is None]
        found = await self.store.get_many(keys) if keys else {}
        return [replace(item, cached=found[item.key]) if item.key in found else item for item in items]
