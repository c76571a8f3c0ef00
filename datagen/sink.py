"""Where a generation run's results go: accepted, rejected, failures and the manifest, under one OutputLayout.

Every file is appended in whole lines (`JsonlWriter.write_many`: the lines of one batch in one write,
flushed; a half-written tail is cut on the next open), so a killed run loses at most the lines it was
writing (their completions are already in the response cache) and a rerun resumes from the ids it
finds. `OutputSink.open` takes the output's lock (datagen.outputs.OutputLock; the command usually holds it
already, from before it read the done ids), so two runs never append to one output; a failed write (a full
disk) is cut back to the last whole line and raised as `OutputWriteError`, which stops the run.

Near-duplicates are decided here, in the run's order: a judged sample is held until every item
before it (by `seq`, which follows ascending image id) is decided, then `NearDuplicateGate.decide`
compares it with the samples kept before it. So among near-copies the first in image order is kept,
whatever order the completions arrive in, and two executors (or two runs from the same cache) accept
the same samples. Held samples are few (those that finished ahead of a slow one) and cost no money
on a crash: their completions are already in the response cache.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datagen.engine.work import RunStats
from datagen.jsonl import JsonlWriter
from datagen.outputs import LineAppender, OutputLock
from datagen.sample import OutputLayout
from datagen.task import Accepted, NearDuplicateGate, Rejected, Verdict
from datagen.urls import redact_text, redact_value


class OutputSink:
    """Appends verdicts and failures to the files of one output layout, deciding near-duplicates in run order."""

    def __init__(self, layout: OutputLayout, split: str, stats: RunStats, gate: NearDuplicateGate | None = None,
                 failures_file: Path | None = None) -> None:
        self.layout = layout
        self.split = split
        self.stats = stats
        self.gate = gate
        self.failures_file = Path(failures_file or layout.failures)
        self.accepted: JsonlWriter | None = None
        self.rejected: JsonlWriter | None = None
        self.failures_fh: LineAppender | None = None
        self.lock: OutputLock | None = None
        self.pending_accepted: list[str] = []  # lines waiting for `flush`: one write per batch
        self.pending_rejected: list[dict[str, Any]] = []
        self.next_seq = 0  # the first item of the run not yet decided
        self.held: dict[int, Verdict | None] = {}  # decided items after next_seq (None: nothing to write)

    def open(self) -> None:
        """Take the output's lock, then open the output files."""
        self.lock = OutputLock(self.layout.samples).acquire()
        try:
            self.accepted = JsonlWriter(self.layout.samples)
            self.rejected = JsonlWriter(self.layout.rejects)
            # The failures file lists the latest run's failures only; it is created at the first one.
            self.failures_file.unlink(missing_ok=True)
        except BaseException:
            self._close_files()
            raise

    def flush(self) -> None:
        """Append the lines decided since the last flush (issue 9: the atomic-append point)."""
        if self.pending_accepted:
            self.accepted.write_lines(self.pending_accepted)
            self.pending_accepted = []
        if self.pending_rejected:
            self.rejected.write_many(self.pending_rejected)
            self.pending_rejected = []

    def close(self) -> None:
        """Write what is still held (in order: nothing before it will come in this run), then close."""
        try:
            for seq in sorted(self.held):
                self._release(self.held.pop(seq))
            if self.accepted is not None:
                self.flush()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        for closable in (self.accepted, self.rejected, self.failures_fh):
            if closable is not None:
                closable.close()
        self.accepted = self.rejected = self.failures_fh = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def skipped(self, count: int) -> None:
        """Records an earlier run finished."""
        self.stats.skipped += count

    def verdict(self, seq: int, verdict: Verdict) -> None:
        """A judged completion, written when its turn in the run's order comes (near-duplicates need it)."""
        if self.gate is None and isinstance(verdict, Rejected):
            self._write(verdict)  # nothing depends on its place in the order
            verdict = None
        self._decided(seq, verdict)

    def failure(self, seq: int, item_id: str, reason: str, attempts: int) -> None:
        """An item that exhausted its retries: listed in the failures file; a rerun retries it."""
        stats = self.stats
        stats.failed += 1
        reason = redact_text(reason)  # an error text may quote the endpoint URL
        stats.failures.append(f"{int(item_id) if item_id.isdigit() else item_id}: {reason}")
        if self.failures_fh is None:
            self.failures_fh = LineAppender(self.failures_file)
        self.failures_fh.append(json.dumps({"id": item_id, "split": self.split, "reason": reason, "attempts": attempts}) + "\n")
        self._decided(seq, None)

    def not_started(self, seq: int) -> None:
        """An item the budget stopped before it was sent."""
        self.stats.budget_stopped += 1
        self._decided(seq, None)

    def _decided(self, seq: int, verdict: Verdict | None) -> None:
        if seq != self.next_seq:
            self.held[seq] = verdict
            return
        self._release(verdict)
        self.next_seq += 1
        while self.next_seq in self.held:
            self._release(self.held.pop(self.next_seq))
            self.next_seq += 1

    def _release(self, verdict: Verdict | None) -> None:
        if verdict is None:
            return
        self._write(self.gate.decide(verdict) if self.gate is not None else verdict)

    def _write(self, verdict: Verdict) -> None:
        stats = self.stats
        if isinstance(verdict, Accepted):
            stats.accepted += 1
            self.pending_accepted.append(verdict.line)
            return
        stats.rejected += 1
        for code in verdict.reasons:
            stats.reject_reasons[code] = stats.reject_reasons.get(code, 0) + 1
        self.pending_rejected.append(verdict.entry)


def write_manifest(layout: OutputLayout, config: dict[str, Any], stats: RunStats) -> None:
    """Append this run's config (as given) and results to the manifest log beside the output."""
    entry = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **config, "stats": asdict(stats)}
    # Credentials in an endpoint URL never reach the file; NaN/Infinity are refused (not JSON), never written.
    line = json.dumps(redact_value(json.loads(json.dumps(entry, default=str))), allow_nan=False)
    with LineAppender(layout.runs) as out:
        out.append(line + "\n")
