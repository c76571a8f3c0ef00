"""The floor: the same POST bodies with a bare aiohttp client (no SDK, no cache, no parsing). Prints one JSON line."""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

import aiohttp


async def run(bodies: list[bytes], url: str, concurrency: int) -> int:
    gate = asyncio.Semaphore(concurrency)
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: bytes) -> None:
            nonlocal done
            async with gate:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1

        await asyncio.gather(*(one(b) for b in bodies))
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args()
    bodies = []
    for line in open(args.requests, encoding="utf-8"):
        row = json.loads(line)
        bodies.append(json.dumps({"model": "gpt-4o-mini", "messages": row["messages"], "temperature": 0.7, "top_p": 0.95,
                                  "max_tokens": 512, "seed": 0}).encode())
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    done = asyncio.run(run(bodies, args.base_url + "/chat/completions", args.concurrency))
    print(json.dumps({"done": done, "wall_s": time.perf_counter() - started_wall, "cpu_s": time.process_time() - started_cpu,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
