"""SQLite response cache: a completion is paid for once per (backend, model, messages, sampling, seed)."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from datagen.backends.base import ChatRequest, Completion
from datagen.errors import VisinstructError

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


def cache_key(backend: str, model: str, request: ChatRequest) -> str:
    """SHA-256 over everything that determines the completion; the prompt text is part of it."""
    payload = {"backend": backend, "model": model, "messages": request.messages, "params": asdict(request.params)}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheStats:
    """What `datagen cache stats` prints."""

    path: Path
    entries: int
    size_bytes: int
    by_model: dict[str, int]
    prompt_tokens: int
    completion_tokens: int


class ResponseCache:
    """One connection to the cache file; use one instance per thread (SQLite connections are thread-bound)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # WAL lets the feeder read while the sink writes; a killed process loses no committed row.
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise VisinstructError(
                f"cannot open the response cache {self.path}: {exc}", "delete the file or pass --cache elsewhere (or --no-cache)"
            ) from None

    def get(self, key: str) -> Completion | None:
        """The stored completion for this key, if any."""
        row = self._db.execute(
            "SELECT text, finish_reason, prompt_tokens, completion_tokens, response_model FROM responses WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        return Completion(text=row[0], finish_reason=row[1], prompt_tokens=row[2], completion_tokens=row[3], model=row[4])

    def put_many(self, rows: list[tuple[str, str, str, str, Completion]]) -> None:
        """Store (key, backend, model, item, completion) rows in one transaction (a group commit)."""
        if not rows:
            return
        now = time.time()
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (key, backend, model, item, now, c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.model)
                for key, backend, model, item, c in rows
            ],
        )
        self._db.execute("COMMIT")

    def stats(self) -> CacheStats:
        """Entry count, file size and token totals, per model."""
        by_model = dict(self._db.execute("SELECT backend || ':' || model, COUNT(*) FROM responses GROUP BY 1").fetchall())
        entries, prompt, completion = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) FROM responses"
        ).fetchone()
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return CacheStats(self.path, entries, size, by_model, prompt, completion)

    def clear(self, model: str | None = None) -> int:
        """Delete all entries (or one model's); return how many went."""
        if model:
            cur = self._db.execute("DELETE FROM responses WHERE model = ?", (model,))
        else:
            cur = self._db.execute("DELETE FROM responses")
        self._db.execute("VACUUM")
        return cur.rowcount

    def close(self) -> None:
        self._db.close()
