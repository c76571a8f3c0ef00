"""Shared fixtures: the read-only coco-mini slice beside the checkout."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COCO_MINI = REPO.parent / "shared" / "coco-mini"


@pytest.fixture(scope="session")
def coco_root() -> Path:
    """../shared/coco-mini (official COCO layout, 79 val2017 + 80 train2017 images)."""
    if not (COCO_MINI / "annotations").is_dir():
        pytest.fail(f"coco-mini not found at {COCO_MINI}: the workspace provides it beside the checkout")
    return COCO_MINI


@pytest.fixture(scope="session")
def prompts_dir() -> Path:
    return REPO / "prompts"


@pytest.fixture(scope="session", autouse=True)
def coco_index_dir(tmp_path_factory) -> Iterator[Path]:
    """COCO indexes built by the suite go to a temp folder, not the user's ~/.cache (subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("coco-index")
    previous = os.environ.get("VISINSTRUCT_INDEX_DIR")
    os.environ["VISINSTRUCT_INDEX_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("VISINSTRUCT_INDEX_DIR", None)
    else:
        os.environ["VISINSTRUCT_INDEX_DIR"] = previous
