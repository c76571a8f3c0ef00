"""COCO index at train2017's size: one-time build, then `datagen generate` memory and start-up.

Writes a deterministic synthetic COCO split (118,287 images, 5 captions each, 860,001 instance
annotations with polygon segmentations: a ~448 MB instances file, like train2017's) into a temp
dir, builds the index in a child process (`datagen coco index`: wall time, peak RSS), then runs
`datagen generate --split detail` against the fake OpenAI server for each --requests count, reporting
the child's peak RSS, the peak RSS of its other processes (judge workers) and the tree's peak PSS, and
the time from its start to the first request the server receives. `--executors local ray` also runs
`--executor ray` (first --requests count), whose driver reports each Ray worker's peak RSS.

    python bench/coco_index_bench.py --requests 2000 20000 --executors local ray
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fake_openai_server import FakeOpenAIServer  # noqa: E402  (a test helper, not a package)

TRAIN2017_IMAGES = 118_287
TRAIN2017_INSTANCES = 860_001
CAPTIONS_PER_IMAGE = 5
WORDS = ("a", "man", "woman", "dog", "cat", "riding", "on", "the", "street", "with", "table", "red", "small",
         "sitting", "next", "to", "bus", "pizza", "two", "people", "in", "front", "of", "large", "white")


def write_synthetic_coco(root: Path, split: str, images: int, instances: int, seed: int = 0) -> None:
    """Deterministic captions_<split>.json and instances_<split>.json in COCO's official layout."""
    rng = random.Random(seed)
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    image_rows = []
    for n in range(images):
        image_id = 9 + n * 3  # sparse ids like COCO's
        width, height = rng.choice([(640, 480), (640, 427), (480, 640), (500, 375), (612, 612)])
        image_rows.append({"license": 1, "file_name": f"{image_id:012d}.jpg", "coco_url": f"http://images.cocodataset.org/{split}/{image_id:012d}.jpg",
                           "height": height, "width": width, "date_captured": "2013-11-14 16:28:13", "id": image_id})
    images_json = ",".join(json.dumps(row) for row in image_rows)
    with open(ann_dir / f"captions_{split}.json", "w") as out:
        out.write('{"info": {"description": "synthetic"}, "licenses": [], "images": [' + images_json + '], "annotations": [')
        ann_id = 0
        for k in range(CAPTIONS_PER_IMAGE):  # annotation order interleaves images, like COCO's files
            chunk = []
            for row in image_rows:
                ann_id += 1
                caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                chunk.append(json.dumps({"image_id": row["id"], "id": ann_id, "caption": caption}))
            out.write(("," if k else "") + ",".join(chunk))
        out.write("]}")
    # A pool of polygons keeps generation fast; sizes follow train2017 (~520 bytes per annotation).
    polygons = [json.dumps([[round(rng.uniform(0, 640), 2) for _ in range(rng.randint(20, 72))]]) for _ in range(512)]
    with open(ann_dir / f"instances_{split}.json", "w") as out:
        out.write('{"info": {"description": "synthetic"}, "licenses": [], "images": [' + images_json + '], "annotations": [')
        chunk = []
        for ann_id in range(1, instances + 1):
            row = image_rows[rng.randrange(images)]
            x, y = rng.uniform(0, row["width"] - 2), rng.uniform(0, row["height"] - 2)
            w, h = rng.uniform(1, row["width"] - x), rng.uniform(1, row["height"] - y)
            chunk.append('{"segmentation": %s, "area": %.2f, "iscrowd": %d, "image_id": %d, "bbox": [%.2f, %.2f, %.2f, %.2f], '
                         '"category_id": %d, "id": %d}' % (rng.choice(polygons), w * h, rng.random() < 0.01, row["id"],
                                                           x, y, w, h, rng.randint(1, 80), ann_id))
            if len(chunk) == 10_000:
                out.write(("," if ann_id > 10_000 else "") + ",".join(chunk))
                chunk = []
        if chunk:
            out.write(("," if instances > len(chunk) else "") + ",".join(chunk))
        cats = ",".join(json.dumps({"supercategory": "thing", "id": c, "name": f"object {c}"}) for c in range(1, 81))
        out.write("], \"categories\": [" + cats + "]}")


@dataclass
class ChildRun:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    cpu_s: float = 0.0
    first_request_s: float | None = None
    first_request_cpu_s: float | None = None
    stdout: str = ""
    tree: dict | None = None  # the process tree's memory (TreeMemory.report)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; PSS shares each page among the processes that map it."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeMemory:
    """Samples a process and its descendants (judge workers) every `period` seconds: peak RSS of the main process,
    of each other process, and peak PSS summed over the tree (what the run really holds; forked pages counted once)."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        self.pid = pid
        self.period = period
        self.main_rss = self.tree_pss = 0
        self.others: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids, todo = [], [self.pid]
            while todo:
                pid = todo.pop()
                pids.append(pid)
                todo += _children(pid)
            total_pss = 0
            for pid in pids:
                rss, pss = _memory_kb(pid)
                total_pss += pss
                if pid == self.pid:
                    self.main_rss = max(self.main_rss, rss)
                else:
                    self.others[pid] = max(self.others.get(pid, 0), rss)
            self.tree_pss = max(self.tree_pss, total_pss)
            self._stop.wait(self.period)

    def report(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        return {"main_peak_rss_mb": round(self.main_rss / 1024), "other_processes": len(self.others),
                "other_peak_rss_mb": sorted(round(v / 1024) for v in self.others.values()),
                "tree_peak_pss_mb": round(self.tree_pss / 1024)}


class TimedServer(FakeOpenAIServer):
    """The fake endpoint, noting when the first chat request arrives."""

    first_request_at: float | None = None
    first_request_cpu_s: float | None = None
    watch_pid: int | None = None

    async def chat(self, request):
        if self.first_request_at is None:
            self.first_request_at = time.monotonic()
            if self.watch_pid is not None:
                self.first_request_cpu_s = process_cpu_s(self.watch_pid)
        return await super().chat(request)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a live process has used (a figure the machine's load does not inflate)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(argv: list[str], env: dict[str, str], server: TimedServer | None = None, cwd: Path = REPO) -> ChildRun:
    """Run one process; its own peak RSS comes from wait4 (not the whole process tree's)."""
    start = time.monotonic()
    # cwd matters: `python -m datagen.cli` imports the package from the working directory first.
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.PIPE)
        if server is not None:
            server.watch_pid = proc.pid
        tree = TreeMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        memory = tree.report()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            print(proc.stderr.read().decode()[-2000:], file=sys.stderr)
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    first = None if server is None or server.first_request_at is None else server.first_request_at - start
    cpu = None if server is None else server.first_request_cpu_s
    return ChildRun(wall, usage.ru_maxrss / 1024, proc.returncode, usage.ru_utime + usage.ru_stime, first, cpu,
                    stdout, memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=TRAIN2017_IMAGES)
    parser.add_argument("--instances", type=int, default=TRAIN2017_INSTANCES)
    parser.add_argument("--requests", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--latency", type=float, default=0.01, help="fake endpoint latency (s)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--baseline-repo", type=Path, help="also run the first --requests count with this checkout's code (e.g. main)")
    parser.add_argument("--rebuild", action="store_true", help="delete an index left in --workdir, to time the build again")
    parser.add_argument("--workdir", type=Path, help="keep the synthetic COCO here (default: a temp dir)")
    parser.add_argument("--executors", nargs="+", default=["local"], choices=["local", "ray"],
                        help="ray: also `generate --executor ray` (a local Ray of this machine's CPUs); each worker "
                             "reports its peak RSS")
    parser.add_argument("--skip-build", action="store_true", help="the index exists: do not time a build")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coco-index-bench-"))
    root, split = workdir / "coco", "train2017"
    if not (root / "annotations" / f"instances_{split}.json").is_file():
        t0 = time.monotonic()
        write_synthetic_coco(root, split, args.images, args.instances)
        print(f"generated synthetic COCO in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    sizes = {p.name: round(p.stat().st_size / 1e6, 1) for p in (root / "annotations").iterdir()}
    env = {**os.environ, "VISINSTRUCT_INDEX_DIR": str(workdir / "index"), "PYTHONPATH": str(REPO)}
    if args.rebuild:
        for old in (workdir / "index").glob("*.cocoidx"):
            old.unlink()
    report: dict = {"annotation_mb": sizes, "load_before": os.getloadavg()}
    if not args.skip_build:
        build = run_child([sys.executable, "-m", "datagen.cli", "coco", "index", "--coco-root", str(root),
                           "--coco-split", split], env)
        index_files = list((workdir / "index").glob("*.cocoidx"))
        report["build"] = {"wall_s": round(build.wall_s, 1), "cpu_s": round(build.cpu_s, 1), "peak_rss_mb": round(build.peak_rss_mb),
                           "rc": build.returncode, "index_mb": round(sum(p.stat().st_size for p in index_files) / 1e6, 1),
                           "said": build.stdout.strip()}
    # What a run (or a worker) pays to reach its records once the index exists, apart from CLI imports.
    probe = ("import time; t0 = time.monotonic(); from datagen.coco import CocoIndex; "
             f"index = CocoIndex({str(root)!r}, {split!r}); ids = index.image_ids(); index.record(ids[-1]); "
             "print(round(time.monotonic() - t0, 3), len(ids))")
    opened = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True)
    report["open_index_s_and_images"] = opened.stdout.split() or opened.stderr[-500:]
    runs = [("index" if executor == "local" else executor, count, str(REPO))
            for executor in args.executors for count in (args.requests if executor == "local" else args.requests[:1])]
    if args.baseline_repo:
        runs.append(("baseline", args.requests[0], str(args.baseline_repo)))
    for label, count, code in runs:
        executor = ["--executor", "ray"] if label == "ray" else []
        with TimedServer(latency_s=args.latency, lifetime_s=7200, record=False) as server:
            out = workdir / f"detail-{label}-{count}.jsonl"
            for stale in workdir.glob(f"detail-{label}-{count}*"):
                stale.unlink()
            run = run_child([sys.executable, "-m", "datagen.cli", "generate", "--split", "detail", "--coco-root", str(root),
                             "--coco-split", split, "--limit", str(count), "--backend", "openai", "--base-url", server.base_url,
                             "--model", "fake", "--concurrency", str(args.concurrency), "--no-cache", "--out", str(out),
                             *executor],
                            {**env, "PYTHONPATH": code}, server, cwd=Path(code))
            lines = sum(1 for _ in open(out)) if out.exists() else 0
            rejects = sum(1 for p in workdir.glob(f"detail-{label}-{count}.rejects*") for _ in open(p))
        report[f"generate_{label}_{count}"] = {
            "code": code, "wall_s": round(run.wall_s, 1), "cpu_s": round(run.cpu_s, 1), "peak_rss_mb": round(run.peak_rss_mb),
            "first_request_s": None if run.first_request_s is None else round(run.first_request_s, 2),
            "cpu_s_at_first_request": run.first_request_cpu_s, "process_tree": run.tree,
            "accepted": lines, "rejected": rejects, "rc": run.returncode,
            "ray_said": [line for line in run.stdout.splitlines() if line.startswith("ray: ")]}
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
