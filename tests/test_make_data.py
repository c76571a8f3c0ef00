"""`make data` as a user runs it: one generate process that loads the model once for every split, and a clear
account of where COCO comes from when there is none."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from datagen.sample import OutputLayout
from guards import HANG_GUARD_S

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (VENV / "bin" / "datagen").exists(),
                                reason="needs make and the venv's datagen script")


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`make` in the repository against the running venv (its install stamp taken as current), this tree's code first."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("COCO_ROOT", None)
    full_env.update(env or {})
    return subprocess.run(["make", "--no-print-directory", "-o", str(VENV / ".installed"), f"VENV={VENV}", *args],
                          cwd=REPO, capture_output=True, text=True, env=full_env, timeout=HANG_GUARD_S)


@pytest.mark.slow
def test_make_data_loads_the_model_once_for_every_split(coco_root, tmp_path):
    proc = make("data", f"COCO_ROOT={coco_root}", f"DATA_DIR={tmp_path}", "LIMIT=1", "MAX_TOKENS=8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model: loading") == 1, proc.stdout
    assert "once for conversation, detail, reasoning" in proc.stdout
    for split in ("conversation", "detail", "reasoning"):
        layout = OutputLayout(tmp_path / f"{split}.jsonl")
        lines = [json.loads(l) for p in (layout.samples, layout.rejects) if p.exists() for l in p.read_text().splitlines()]
        assert [r["id"] for r in lines] == ["000000000139"], split
        manifest = [json.loads(l) for l in layout.runs.read_text().splitlines()]
        assert manifest[-1]["backend"] == "local" and manifest[-1]["config"]["source"]["split"] == split
        assert f"progress: {split} 1/1 done" in proc.stderr  # piped: plain lines, not a bar


def test_make_data_without_coco_says_why_it_fetches_and_how_to_avoid_it(tmp_path):
    proc = make("data", f"SHARED_COCO={tmp_path / 'no-shared'}", f"FETCH_DIR={tmp_path / 'coco'}",
                "COCO_MIRROR=http://127.0.0.1:9", f"DATA_DIR={tmp_path / 'data'}")
    assert proc.returncode != 0
    said = proc.stdout.splitlines()
    assert said[0].startswith("no COCO root found: COCO_ROOT is unset and there is no ")
    assert said[1].startswith("fetching from http://127.0.0.1:9 into ") and "annotations archive" in said[1]
    assert "error: cannot download" in proc.stderr and "COCO_ROOT=" in proc.stderr
    assert not (tmp_path / "data").exists()
