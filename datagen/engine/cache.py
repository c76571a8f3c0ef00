"""SQLite response cache: a completion is paid for once per (backend, model, messages, sampling, seed)."""
from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from datagen.backends.base import ChatRequest, Completion
from datagen.errors import VisinstructError
from datagen.outputs import write_error

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    item TEXT NOT NULL,
    created REAL NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    response_model TEXT NOT NULL
)
"""


# How long a connection waits for another one's lock before the run stops with "the response cache is busy".
BUSY_TIMEOUT_S = 30.0

# A request's further completions (n > 1) are stored as rows `<key>#1`, `<key>#2`, ... beside its first.
ALTERNATIVE_MARK = "#"
# Keys per `get_many` query: under SQLite's bound on a statement's parameters (999 before 3.32).
KEYS_PER_QUERY = 500
_KEY_JSON = {"sort_keys": True, "ensure_ascii": False, "separators": (",", ":")}


def cache_key(backend: str, model: str, request: ChatRequest) -> str:
    """SHA-256 over everything that determines the completion; the prompt text is part of it."""
    payload = {"backend": backend, "model": model, "messages": request.messages, "params": request.params.key_fields()}
    blob = json.dumps(payload, **_KEY_JSON)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class MessagesJson:
    """`json.dumps(messages, **options)`, remembering the encoding of every message but the last.

    In a run the system prompt and few-shot examples open every request and only the image's own message
    differs, so each request costs the encoding of one message instead of the whole prompt. The text is
    exactly json.dumps's (a message list is "[" + the messages joined by the item separator + "]").
    """

    MEMO_SIZE = 16  # distinct prompt heads remembered (one per split and prompt set in practice)

    def __init__(self, **options: Any) -> None:
        self.options = options
        if options.get("indent") is not None:
            raise ValueError("indented JSON is not supported")
        self.separator = (options.get("separators") or (", ", ": "))[0]
        self.memo: dict[tuple, str] = {}

    def head(self, messages: list[dict[str, Any]]) -> str | None:
        """"[" and every message but the last, each followed by the separator; None if a message cannot be a key."""
        try:
            # The value's class is part of the key: 1, 1.0 and True are equal but encode differently.
            key = tuple(tuple((k, v.__class__, v) for k, v in m.items()) for m in messages[:-1])
            text = self.memo.get(key)
        except (TypeError, AttributeError):  # unhashable content (a list of parts), or not a dict
            return None
        if text is None:
            if len(self.memo) >= self.MEMO_SIZE:
                self.memo.clear()
            text = self.memo[key] = "[" + "".join(json.dumps(m, **self.options) + self.separator for m in messages[:-1])
        return text

    def encode(self, messages: list[dict[str, Any]]) -> str:
        head = self.head(messages) if messages else None
        if head is None:
            return json.dumps(messages, **self.options)
        return head + json.dumps(messages[-1], **self.options) + "]"


class CacheKeys:
    """`cache_key` for one backend and model, with the shared prompt head and the sampling settings encoded and
    hashed once (the planner keys every request of a run; tests check it gives cache_key's exact digest)."""

    def __init__(self, backend: str, model: str) -> None:
        self.backend = backend
        self.model = model
        self.messages = MessagesJson(**_KEY_JSON)
        # With sort_keys the payload reads backend, messages, model, params.
        self._start = '{"backend":' + json.dumps(backend, **_KEY_JSON) + ',"messages":'
        self._model = ',"model":' + json.dumps(model, **_KEY_JSON) + ',"params":'
        self._params: dict[Any, str] = {}
        self._heads: dict[str, Any] = {}  # encoded head -> sha256 state after it

    def key(self, request: ChatRequest) -> str:
        params = self._params.get(request.params)
        if params is None:
            params = self._params[request.params] = json.dumps(request.params.key_fields(), **_KEY_JSON) + "}"
        messages = request.messages
        head = self.messages.head(messages) if messages else None
        if head is None:
            blob = self._start + json.dumps(messages, **_KEY_JSON) + self._model + params
            return hashlib.sha256(blob.encode("utf-8")).hexdigest()
        state = self._heads.get(head)
        if state is None:
            if len(self._heads) >= MessagesJson.MEMO_SIZE:
                self._heads.clear()
            state = self._heads[head] = hashlib.sha256((self._start + head).encode("utf-8"))
        digest = state.copy()
        digest.update((json.dumps(messages[-1], **_KEY_JSON) + "]" + self._model + params).encode("utf-8"))
        return digest.hexdigest()


@dataclass(frozen=True)
class CacheStats:
    """What `datagen cache stats` prints."""

    path: Path
    entries: int
    size_bytes: int
    by_model: dict[str, int]
    prompt_tokens: int
    completion_tokens: int


def cache_files(path: Path) -> list[Path]:
    """The cache file and SQLite's companions beside it (-wal, -shm, -journal) that exist."""
    path = Path(path)
    return [p for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))) if p.exists()]


def cache_error(path: Path, exc: BaseException) -> VisinstructError:
    """What a failing SQLite call on the cache means to the user, and how to get going again."""
    text = str(exc)
    if "full" in text or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        # A full disk under the cache: the run stops like any failed output write (datagen.outputs).
        return write_error(path, exc if isinstance(exc, OSError) else OSError(errno.ENOSPC, text), resume=True)
    if "locked" in text or "busy" in text:
        return VisinstructError(f"the response cache {path} is busy ({text})",
                                "another process holds it; wait for it, or pass --cache elsewhere or --no-cache")
    if isinstance(exc, OSError) or "unable to open" in text or "readonly" in text or "disk I/O" in text:
        return VisinstructError(f"cannot use the response cache {path} ({text})",
                                "check the folder's space and permissions, or pass --cache elsewhere or --no-cache")
    return VisinstructError(
        f"the response cache {path} is damaged ({text})",
        f"remove it with `datagen cache clear --all --cache {path}` (its responses are paid for again), "
        "or pass --cache elsewhere or --no-cache",
    )


@contextmanager
def _guarded(path: Path) -> Iterator[None]:
    """SQLite errors on the cache (a damaged file, a locked one) become one user error naming the file."""
    try:
        yield
    except sqlite3.Error as exc:
        raise cache_error(path, exc) from None


class ResponseCache:
    """One connection to the cache file; use one instance per thread (SQLite connections are thread-bound).

    Every SQLite failure, at open or in any later call, is a VisinstructError naming the file.
    """

    def __init__(self, path: Path, read_only: bool = False) -> None:
        """read_only: open an existing cache without changing it (`cache stats`); it must hold the responses table."""
        self.path = Path(path)
        if self.path.is_dir():
            raise VisinstructError(f"the response cache {self.path} is a folder", "pass --cache FILE, or --no-cache")
        if read_only:
            with _guarded(self.path):
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
                tables = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            if ("responses",) not in tables:
                self._db.close()
                raise VisinstructError(f"{self.path} is not a response cache (it has no responses table)",
                                       "pass the cache file with --cache")
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cache_error(self.path, exc) from None
        with _guarded(self.path):
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                self._set_up()
            except BaseException:
                self._db.close()
                raise

    def _set_up(self) -> None:
        """WAL mode and the table, safe while other connections (threads, processes) open the same new file.

        SQLite answers "database is locked" at once, without waiting on the busy timeout, when two connections
        switch a new file to WAL together or when one creates the table under another's read: those steps are
        retried until the busy timeout has passed.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.005
        while True:
            try:
                # WAL lets the feeder read while the sink writes; a killed process loses no committed row.
                if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'responses'").fetchone():
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        self._db.execute(_SCHEMA)
                        self._db.execute("COMMIT")
                    except BaseException:
                        if self._db.in_transaction:
                            self._db.execute("ROLLBACK")
                        raise
                return
            except sqlite3.OperationalError as exc:
                text = str(exc)
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.25)

    def get(self, key: str) -> Completion | None:
        """The stored completion for this key, if any (with its alternatives, stored as rows `<key>#1`, `<key>#2`...)."""
        with _guarded(self.path):
            rows = self._db.execute(
                "SELECT key, text, finish_reason, prompt_tokens, completion_tokens, response_model FROM responses "
                "WHERE key = ? OR (key > ? AND key < ?)", (key, key + ALTERNATIVE_MARK, key + chr(ord(ALTERNATIVE_MARK) + 1)),
            ).fetchall()
        found = {row[0]: Completion(text=row[1], finish_reason=row[2], prompt_tokens=row[3], completion_tokens=row[4],
                                    model=row[5]) for row in rows}
        first = found.pop(key, None)
        if first is None:
            return None
        ordered = sorted(found.items(), key=lambda kv: int(kv[0].rsplit(ALTERNATIVE_MARK, 1)[1]))
        return replace(first, alternatives=tuple(c for _, c in ordered)) if ordered else first

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        """`get` for each of `keys` that has a stored completion: one query per `KEYS_PER_QUERY` keys finds which
        do (most often none), then each found one is read as `get` reads it."""
        found: list[str] = []
        with _guarded(self.path):
            for start in range(0, len(keys), KEYS_PER_QUERY):
                part = keys[start:start + KEYS_PER_QUERY]
                marks = ", ".join("?" * len(part))
                found += [key for (key,) in self._db.execute(f"SELECT key FROM responses WHERE key IN ({marks})", part)]
        completions = {key: self.get(key) for key in found}
        return {key: completion for key, completion in completions.items() if completion is not None}

    def put_many(self, rows: list[tuple[str, str, str, str, Completion]]) -> None:
        """Store (key, backend, model, item, completion) rows in one transaction (a group commit)."""
        if not rows:
            return
        now = time.time()
        with _guarded(self.path):
            # IMMEDIATE takes the write lock at once (waiting up to the busy timeout while another process
            # writes), so runs sharing one cache queue their commits rather than fail on a lock upgrade.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (k, backend, model, item, now, c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.model)
                        for key, backend, model, item, first in rows
                        for k, c in ((key if i == 0 else f"{key}{ALTERNATIVE_MARK}{i}", c) for i, c in enumerate(first.choices))
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def stats(self) -> CacheStats:
        """Entry count, file size and token totals, per model."""
        with _guarded(self.path):
            by_model = dict(self._db.execute("SELECT backend || ':' || model, COUNT(*) FROM responses GROUP BY 1").fetchall())
            entries, prompt, completion = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) FROM responses"
            ).fetchone()
        size = sum(p.stat().st_size for p in cache_files(self.path))
        return CacheStats(self.path, entries, size, by_model, prompt, completion)

    def clear(self, model: str | None = None) -> int:
        """Delete all entries (or one model's); return how many went."""
        with _guarded(self.path):
            if model:
                cur = self._db.execute("DELETE FROM responses WHERE model = ?", (model,))
            else:
                cur = self._db.execute("DELETE FROM responses")
            self._db.execute("VACUUM")
        return cur.rowcount

    def close(self) -> None:
        with _guarded(self.path):
            self._db.close()


def remove_cache(path: Path) -> list[Path]:
    """Delete the cache file and its companions, whatever state they are in; return what was removed."""
    removed = []
    for file in cache_files(path):
        try:
            file.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise VisinstructError(f"cannot remove {file} ({exc.strerror or exc})", "check its permissions") from None
        removed.append(file)
    return removed
