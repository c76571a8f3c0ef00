"""The issue's acceptance drills at benchmark scale (not a timed test):

1. faults: 10% 429s, 5% 500s and 2% timeouts injected; every image must end accounted for, none doubled;
2. kill -9: the run is killed mid-way and rerun; nothing persisted before the kill may be requested again.
Prints the figures. Usage: .venv/bin/python bench/fault_drill.py [--count 2000]
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_workload import workload  # noqa: E402
from fake_openai_server import FakeOpenAIServer, FaultPlan, prompt_digest  # noqa: E402

from datagen.context import render_context  # noqa: E402


def ids_in(*paths: Path) -> list[str]:
    out = []
    for path in paths:
        if path.exists():
            out += [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]
    return out


def engine_argv(count: int, base_url: str, workdir: Path, concurrency: int) -> list[str]:
    return [sys.executable, str(HERE / "ours.py"), "--count", str(count), "--base-url", base_url, "--concurrency",
            str(concurrency), "--workdir", str(workdir), "--timeout", "1.0", "--max-retries", "8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="datagen-drill-"))
    expected = {f"{r.id:012d}" for r in workload(args.count)}
    digest_of = {f"{r.id:012d}": prompt_digest([{"content": render_context(r, with_boxes=False)}]) for r in workload(args.count)}

    plan = FaultPlan(rates={"429": 0.10, "500": 0.05, "timeout": 0.02}, seed=1, retry_after_s=0.2, timeout_sleep_s=2.0)
    with FakeOpenAIServer(latency_s=0.05, faults=plan, lifetime_s=1800) as server:
        work = root / "faults"
        proc = subprocess.run(engine_argv(args.count, server.base_url, work, args.concurrency), capture_output=True, text=True)
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        ids = ids_in(work / "conversation.jsonl", work / "conversation.rejects.jsonl")
        print(f"fault drill: {args.count} images, {server.state.count} requests, injected {dict(server.state.faults)}")
        print(f"  written {len(ids)} ({len(set(ids))} distinct), missing {len(expected - set(ids))}, "
              f"failed after retries {stats['failed']}, retries {stats['retries']}, {stats['wall_s']:.1f}s")

    with FakeOpenAIServer(latency_s=0.05, lifetime_s=1800) as server:
        work = root / "kill"
        out, rejects = work / "conversation.jsonl", work / "conversation.rejects.jsonl"
        argv = engine_argv(args.count, server.base_url, work, args.concurrency)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(ids_in(out, rejects)) < args.count * 0.4 and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        import sqlite3

        with sqlite3.connect(work / "cache.sqlite") as db:
            cached = {f"{int(row[0].split(':')[0]):012d}" for row in db.execute("SELECT item FROM responses")}
        persisted = set(ids_in(out, rejects)) | cached
        before = server.state.count
        rerun = subprocess.run(argv, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        again = Counter(r["digest"] for r in server.state.requests[before:])
        final = ids_in(out, rejects)
        repeated_persisted = sum(1 for i in persisted if digest_of[i] in again)
        sent_twice = sum(1 for n in server.state.attempts.values() if n > 1)
        print(f"kill -9 drill: killed after {before} requests with {len(persisted)} results persisted "
              f"({len(set(ids_in(out, rejects)) & persisted)} in the output, {len(cached)} in the cache)")
        print(f"  rerun sent {sum(again.values())} requests for {args.count - len(persisted)} unfinished images; "
              f"persisted results requested again: {repeated_persisted}; images sent twice overall: {sent_twice} "
              f"(in flight, or answered but not yet stored, at the kill; concurrency {args.concurrency})")
        print(f"  final: {len(final)} lines, {len(set(final))} distinct ids, missing {len(expected - set(final))}")


if __name__ == "__main__":
    main()
