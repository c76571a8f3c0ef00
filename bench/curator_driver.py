"""Runs the benchmark's requests through bespokelabs-curator (in its own venv) and prints one JSON line of figures.

Usage: bench/.venv-curator/bin/python bench/curator_driver.py --requests R.jsonl --base-url URL --concurrency N --workdir D
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)

    from bespokelabs import curator  # imported after the env flags the caller set (telemetry, viewer, rich display off)

    rows = [json.loads(line) for line in open(args.requests, encoding="utf-8") if line.strip()]

    class Writer(curator.LLM):
        """The same request per row as our engine sends; the parser keeps the text, like our parser's input."""

        def prompt(self, row):
            return row["messages"]

        def parse(self, row, response):
            return {"id": row["id"], "text": response}

    llm = Writer(
        model_name=args.model,
        backend="openai",
        generation_params={"temperature": 0.7, "top_p": 0.95, "max_tokens": 512, "seed": 0},
        backend_params={
            "base_url": args.base_url,
            "api_key": "sk-bench",
            "max_concurrent_requests": args.concurrency,
            "max_requests_per_minute": 10_000_000,
            "max_tokens_per_minute": 10_000_000_000,
            "max_retries": 3,
            "request_timeout": 60,
        },
    )
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    result = llm(rows, working_dir=args.workdir)
    wall, cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    dataset = result.dataset if hasattr(result, "dataset") else result
    print(json.dumps({"done": len(dataset), "wall_s": wall, "cpu_s": cpu,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    os.environ.setdefault("TELEMETRY_ENABLED", "false")
    main()
