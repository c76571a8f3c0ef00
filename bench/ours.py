"""Our engine on the benchmark workload (cache writes, parsing, quality checks, JSONL). Prints one JSON line."""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402,F401 - imported before the clock, as the bare client does (the engine imports it on first use)
from bench_workload import workload  # noqa: E402

from datagen.backends.base import SamplingParams  # noqa: E402
from datagen.backends.openai_backend import OpenAIBackend  # noqa: E402
from datagen.engine.config import EngineConfig  # noqa: E402
from datagen.executors.local import run_local  # noqa: E402
from datagen.sample import OutputLayout  # noqa: E402
from datagen.task import LlavaTask  # noqa: E402
from datagen.prompts import load_prompt_set  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the sink process, when checks run there)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--transport", default="direct")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--stream", action="store_true", help="feed records lazily (memory check) instead of a prebuilt list")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-retries", type=int, default=6)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    task = LlavaTask("conversation", load_prompt_set(None, "conversation"), SamplingParams(),
                     provenance={"backend": "openai"}, gate=not args.no_checks)
    config = EngineConfig(cache_path=args.workdir / "cache.sqlite", max_retries=args.max_retries,
                          backoff_base_s=0.05, backoff_max_s=2.0)
    # Built before the clock starts, like curator's input dataset; --stream shows the engine's own memory is flat.
    records = workload(args.count) if args.stream else list(workload(args.count))

    async def go():
        backend = OpenAIBackend("gpt-4o-mini", base_url=args.base_url, api_key="sk-bench", concurrency=args.concurrency,
                                transport=args.transport, timeout=args.timeout)
        try:
            return await run_local(task, OutputLayout(args.workdir / "conversation.jsonl"), backend, records, config,
                                   args.concurrency)
        finally:
            await backend.aclose()

    started_wall, started_cpu = time.perf_counter(), cpu_seconds()
    stats = asyncio.run(go())
    print(json.dumps({"done": stats.accepted + stats.rejected, "failed": stats.failed, "accepted": stats.accepted,
                      "requests": stats.requests, "retries": stats.retries,
                      "wall_s": time.perf_counter() - started_wall, "cpu_s": cpu_seconds() - started_cpu,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
