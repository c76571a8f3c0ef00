"""Evaluation end to end on tiny exported checkpoints: report, contamination guard, --compare."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest_train import COCO, coco_captions, smollm_tokenizer, tiny_clip_tower, tiny_llm
from datagen.backends.base import ChatRequest, Completion
from model.export import export
from model.llava import LlavaLite
from model.projector import build_projector
from model.vision import build_image_processor
from train.eval import run as eval_run

pytestmark = pytest.mark.slow

TRAINED = 2  # the first val2017 images are "trained on" by the fake run


def make_run(root: Path, seed: int) -> Path:
    """A run folder like training writes: stage2/config.yaml naming its data, and final/ (the export)."""
    tok = smollm_tokenizer()
    torch.manual_seed(seed + 1)
    model = LlavaLite(tiny_clip_tower(seed), build_projector("linear", 32, 64), tiny_llm(tok, seed),
                      tok.convert_tokens_to_ids("<image>")).eval()
    export(model, tok, build_image_processor(None, model.tower, True), "linear", root / "final")
    data = root / "train.jsonl"
    rows = [{"id": f"t{k}", "image": name, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                             {"from": "gpt", "value": caps[0]}]}
            for k, (name, caps) in enumerate(coco_captions("val2017")[:TRAINED])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "stage2").mkdir()
    (root / "stage2" / "config.yaml").write_text(f"model:\n  vision_tower: null\nstage2:\n  data: [{data}]\n")
    return root / "final"


def heldout_file(path: Path) -> Path:
    """Three held-out samples of images the runs were not trained on, one per split."""
    rows = []
    for split, (name, caps) in zip(("conversation", "detail", "reasoning"), coco_captions("val2017")[TRAINED:TRAINED + 3]):
        rows.append({"id": f"{name[:-4]}-{split}", "image": name, "split": split, "conversations": [
            {"from": "human", "value": "<image>\nWhat is happening here?"}, {"from": "gpt", "value": caps[0]},
            {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": caps[1]}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class PairJudge:
    """Judge stand-in: reference 8, model 4 (a real judge is measured separately; this tests the plumbing)."""

    name, model, preferred_concurrency = "scripted", "pair-judge", 4

    async def complete(self, request: ChatRequest) -> Completion:
        return Completion("8 4\nThe first answer matches the description.", "stop", 1, 1, self.model)

    async def aclose(self) -> None:
        pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("eval")
    return make_run(base / "a", 0), make_run(base / "b", 1), heldout_file(base / "heldout.jsonl")


def args(model_flag: list[str], out: Path, heldout: Path, *extra: str) -> list[str]:
    return [*model_flag, "--coco-root", str(COCO), "--coco-split", "val2017", "--heldout", str(heldout), "--out", str(out),
            "--pope-images", "3", "--chair-images", "2", "--describe-tokens", "12", "--answer-tokens", "8", *extra]


def test_eval_report_and_guard(runs, tmp_path: Path, monkeypatch, capsys) -> None:
    a, _, heldout = runs
    monkeypatch.setattr("train.eval.run.make_backend", lambda *x, **k: PairJudge())
    # The evaluation split holds the training images: refused without the flag (exit 2, one line) ...
    assert eval_run.main(args(["--model", str(a)], tmp_path / "r", heldout)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "were used in training" in err and "--drop-contaminated" in err and "\n" not in err
    # ... and evaluated on the rest with it, saying how many were dropped.
    assert eval_run.main(args(["--model", str(a)], tmp_path / "r", heldout, "--drop-contaminated")) == 0
    out = capsys.readouterr()
    assert f"dropped {TRAINED} of 79 pope images" in out.err
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert report["contamination"]["dropped"]["pope"] == TRAINED and report["contamination"]["training_images"] == TRAINED
    for sampling in ("random", "popular", "adversarial"):
        pope = report["sections"]["pope"][sampling]
        assert pope["questions"] == 3 * 6 and pope["tp"] + pope["fn"] == pope["fp"] + pope["tn"] == 9
    pope_rows = [json.loads(l) for l in (tmp_path / "r" / "pope-answers.jsonl").read_text().splitlines()]
    trained_ids = {int(n[:-4]) for n, _ in coco_captions("val2017")[:TRAINED]}
    assert not trained_ids & {r["image_id"] for r in pope_rows}
    assert report["sections"]["chair"]["samples"] == 2
    bench = report["sections"]["bench"]
    assert bench["all"]["judged"] == 3 and bench["all"]["relative_score"] == pytest.approx(50.0)
    assert set(bench) >= {"conversation", "detail", "reasoning"}
    loss = report["sections"]["loss"]
    assert loss["all"]["samples"] == 3 and loss["all"]["loss"] > 0 and loss["all"]["answer_tokens"] > 0
    assert eval_run.RANDOM_TOWER_NOTE in report["notes"] and "RANDOM vision tower" in out.out
    assert "| pope/adversarial/f1 |" in out.out and "| heldout/all/loss |" in out.out


def test_held_out_loss_uses_training_masking(runs) -> None:
    """Only answer tokens carry labels: the loss counts exactly the tokens the trainer would train on."""
    from train.data import ConversationEncoder, to_messages
    from train.eval.model_io import IGNORE, ExportedModel

    a, _, heldout = runs
    model = ExportedModel(a)
    record = json.loads(heldout.read_text().splitlines()[0])
    ids, labels = model.encode(record)
    base_ids, base_labels = ConversationEncoder(model.processor.tokenizer).encode(to_messages(record, "<image>"))
    assert sum(l != IGNORE for l in labels) == sum(l != IGNORE for l in base_labels) > 0
    assert len(ids) == len(base_ids) - 1 + model.image_tokens
    (total, tokens), = model.answer_loss([record], COCO / "val2017")
    assert tokens == sum(l != IGNORE for l in labels[1:])


def test_compare_two_checkpoints(runs, tmp_path: Path, monkeypatch, capsys) -> None:
    a, b, heldout = runs
    monkeypatch.setattr("train.eval.run.make_backend", lambda *x, **k: PairJudge())
    assert eval_run.main(args(["--compare", str(a), str(b)], tmp_path / "cmp", heldout, "--drop-contaminated",
                              "--skip", "chair")) == 0
    table = capsys.readouterr().out
    ra = json.loads((tmp_path / "cmp" / "A" / "eval.json").read_text())
    rb = json.loads((tmp_path / "cmp" / "B" / "eval.json").read_text())
    assert ra["checkpoint_hash"] != rb["checkpoint_hash"] and ra["questions_hash"] == rb["questions_hash"]
    diffs = json.loads((tmp_path / "cmp" / "compare.json").read_text())["difference"]
    for name, va in ra["metrics"].items():
        vb = rb["metrics"][name]
        if va is not None and vb is not None:
            assert diffs[name] == pytest.approx(vb - va)
            assert f"| {name} |" in table and f"{vb - va:+.4f}" in table
    assert "Warning" not in table
    # Comparing the two written reports gives the same table without loading a model.
    assert eval_run.main(["--compare", str(tmp_path / "cmp" / "A"), str(tmp_path / "cmp" / "B" / "eval.json")]) == 0
    assert capsys.readouterr().out.strip() == table.strip()
