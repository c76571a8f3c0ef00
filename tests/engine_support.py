"""Helpers shared by the engine tests: run the engine in-process or the CLI in a subprocess."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from datagen.backends.base import SamplingParams
from datagen.backends.openai_backend import OpenAIBackend
from datagen.coco import CocoIndex
from datagen.engine.config import EngineConfig
from datagen.engine.work import RunStats
from datagen.executors.local import run_local
from datagen.prompts import SPLITS_WITH_BOXES, load_prompt_set
from datagen.sample import OutputLayout
from datagen.task import LlavaTask
from guards import HANG_GUARD_S

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"


def load_index(coco_root: Path, split: str = "conversation", coco_split: str = "val2017") -> CocoIndex:
    return CocoIndex(coco_root, coco_split, with_instances=split in SPLITS_WITH_BOXES)


def run_engine(base_url: str, out: Path, coco_root: Path, *, split: str = "conversation", limit: int | None = None,
               concurrency: int = 8, timeout: float = 60.0, prompts_dir: Path | None = None, api_key: str = "sk-test",
               model: str = MODEL, transport: str = "direct", **engine) -> RunStats:
    """One in-process run of the engine against `base_url`."""
    index = load_index(coco_root, split)
    ids = index.image_ids()[:limit] if limit else index.image_ids()
    engine.setdefault("backoff_base_s", 0.01)
    engine.setdefault("backoff_max_s", 0.05)
    task = LlavaTask(split, load_prompt_set(prompts_dir, split), SamplingParams(max_tokens=300),
                     provenance={"backend": "openai"}, gate=False)

    async def go() -> RunStats:
        backend = OpenAIBackend(model=model, base_url=base_url, api_key=api_key, timeout=timeout, concurrency=concurrency,
                                transport=transport)
        try:
            return await run_local(task, OutputLayout(out), backend, index.records(ids), EngineConfig(**engine), concurrency)
        finally:
            await backend.aclose()

    return asyncio.run(go())


def ids_of(*paths: Path) -> list[str]:
    """Every id in these JSONL files, duplicates kept."""
    ids = []
    for path in paths:
        if path.exists():
            ids += [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]
    return ids


def datagen(*args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = HANG_GUARD_S, **popen) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it."""
    full_env = {**os.environ, "OPENAI_API_KEY": "sk-test", **(env or {})}
    return subprocess.run([sys.executable, "-m", "datagen.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], proc.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def datagen_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process (saves the interpreter start); same result shape as `datagen`."""
    from typer.testing import CliRunner

    from datagen.cli import app
    from datagen.errors import VisinstructError

    result = CliRunner().invoke(app, list(args), env={"OPENAI_API_KEY": "sk-test", **(env or {})})
    stderr = result.stderr
    code = result.exit_code
    if isinstance(result.exception, VisinstructError):
        stderr, code = f"error: {result.exception}\n", 2
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), code, result.stdout, stderr)
