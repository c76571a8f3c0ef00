"""Our Ray Data executor on the benchmark workload (same task, checks, cache and files as ours.py). Prints one JSON line.

It starts its own local Ray (--num-cpus, default all of this machine's) unless --ray-address names one.
`wall_s` is the work: from the first worker call to the last result written. Cluster start-up (ray.init,
then the actor pool's start until its first call) is reported apart as `startup_s`, not in `wall_s`.
`cpu_s` is the driver's only (the workers are separate processes of the cluster).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_workload import workload  # noqa: E402

from datagen.backends.base import SamplingParams  # noqa: E402
from datagen.engine.config import EngineConfig  # noqa: E402
from datagen.executors.ray_executor import BackendSpec, run_ray  # noqa: E402
from datagen.prompts import load_prompt_set  # noqa: E402
from datagen.sample import OutputLayout  # noqa: E402
from datagen.task import LlavaTask  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this (driver) process."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--max-retries", type=int, default=6)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    task = LlavaTask("conversation", load_prompt_set(None, "conversation"), SamplingParams(),
                     provenance={"backend": "openai"}, gate=not args.no_checks)
    config = EngineConfig(cache_path=args.workdir / "cache.sqlite", max_retries=args.max_retries,
                          backoff_base_s=0.05, backoff_max_s=2.0)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    records = list(workload(args.count))  # built before the clock starts, as in ours.py
    spec = BackendSpec("openai", "gpt-4o-mini", args.base_url, timeout=args.timeout)
    started_wall, started_cpu = time.perf_counter(), cpu_seconds()
    run = run_ray(task, OutputLayout(args.workdir / "conversation.jsonl"), spec, records, config, args.concurrency,
                  address=args.ray_address, num_cpus=args.num_cpus)
    stats, timings = run.stats, run.timings
    print(json.dumps({"done": stats.accepted + stats.rejected, "failed": stats.failed, "accepted": stats.accepted,
                      "requests": stats.requests, "retries": stats.retries, "wall_s": timings.work_s,
                      "startup_s": timings.connect_s + timings.first_request_after_s, "connect_s": timings.connect_s,
                      "plan_s": timings.plan_s,
                      "total_s": time.perf_counter() - started_wall, "workers": timings.workers,
                      "cpu_s": cpu_seconds() - started_cpu,
                      "worker_peak_rss_mb": sorted(timings.worker_peak_rss_mb.values()),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
