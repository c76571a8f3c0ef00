"""The trainer takes an exported Hugging Face folder as stage-2 data (a tiny model, two steps)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest_train import COCO, save_tiny_llm, tiny_clip_config, write_caption_pairs, write_instruct
from datagen.hf_dataset import HfExportOptions
from datagen.hf_export import write_hf_folder
from model.llava import ModelConfig
from train.config import RunConfig, StageConfig
from train.loop import train_stage


@pytest.mark.parametrize("embed", [True, False], ids=["embedded-images", "image-paths"])
def test_stage2_trains_on_an_exported_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embed: bool) -> None:
    monkeypatch.setenv("VISINSTRUCT_IMAGE_CACHE", str(tmp_path / "hf-images"))
    samples = write_instruct(tmp_path / "conversation.jsonl", n=8)
    folder = tmp_path / "hf"
    # The image column names files relative to the image root, which the config gives as image_folder.
    write_hf_folder([samples], folder, HfExportOptions(embed_images=embed, image_root=COCO / "val2017"))
    (folder / "README.md").write_text("")  # a card is not needed to read the shards
    caps = write_caption_pairs(tmp_path / "caps.jsonl", n=4)
    cfg = RunConfig(
        name="hf", output_dir=str(tmp_path / "run"), seed=0,
        model=ModelConfig(llm=str(save_tiny_llm(tmp_path / "llm")), vision_config=tiny_clip_config(), projector="mlp2x_gelu"),
        stage1=StageConfig(data=[str(caps)], image_folder=str(COCO / "train2017"), max_steps=1, max_length=64),
        # With embedded images the folder's images are used wherever image_folder points.
        stage2=StageConfig(data=[str(folder)], image_folder=str(COCO / ("val2017" if not embed else "train2017")),
                           batch_size=2, max_steps=2, max_length=128, init_projector=""),
        save_every=2,
    )
    result = train_stage(cfg, 2, do_export=False)
    rows = [json.loads(line) for line in (result.stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
