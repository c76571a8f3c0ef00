"""`python -m train.eval.run`: evaluate an exported checkpoint (POPE, CHAIR, judged benchmark, held-out loss).

    python -m train.eval.run --model runs/smoke/final --coco-root ../shared/coco-mini --coco-split val2017 \\
        --heldout data/heldout/*.jsonl --drop-contaminated
    python -m train.eval.run --compare runs/a/final runs/b/final --coco-root ... (same flags; or two eval.json)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datagen.cli.common import make_backend
from datagen.context import render_context
from datagen.errors import VisinstructError
from datagen.escaping import terminal_text
from datagen.judge import load_judge_prompts
from datagen.run_config import BackendName, ModelOptions
from datagen.sample import default_cache_path
from datagen.sample import read_samples as read_sample_file
from train.arguments import ArgumentParser
from train.eval.contamination import TrainingImages, guard, image_id_of, training_images
from train.eval.pope import SAMPLINGS, CocoObjects, build_pope, parse_yes_no, score_pope
from train.eval.report import REPORT_NAME, compare_table, load_report, markdown_table

log = logging.getLogger("train.eval")

SECTIONS = ("pope", "chair", "bench", "loss")
RANDOM_TOWER_NOTE = ("NOTE: this checkpoint has a RANDOM vision tower (a smoke run): its figures measure nothing "
                     "about images and are meaningless except as a check that evaluation runs.")


@dataclass
class EvalConfig:
    """Everything one evaluation run needs; every field is recorded in eval.json."""

    model: Path
    coco_root: Path
    coco_split: str = "val2017"
    out: Path | None = None
    heldout: list[Path] = field(default_factory=list)
    image_folder: Path | None = None
    seed: int = 0
    pope_images: int | None = 100
    pope_per_image: int = 3
    chair_images: int | None = 50
    bench_limit: int | None = None
    judge_backend: str = "auto"
    judge_model: str | None = None
    judge_base_url: str | None = None
    judge_cache: Path | None = None
    drop_contaminated: bool = False
    check_contamination: bool = True
    skip: tuple[str, ...] = ()
    batch_size: int = 8
    pope_tokens: int = 8
    describe_tokens: int = 96
    answer_tokens: int = 128
    # --compare: the other checkpoint, whose training images are left out here too (same images for A and B).
    compare_with: list[Path] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return self.out or Path(self.model).resolve().parent / "eval"

    @property
    def images(self) -> Path:
        return self.image_folder or Path(self.coco_root) / self.coco_split


def file_sha(path: Path) -> str:
    """Short SHA-256 of a data file (recorded so two reports can be checked for the same inputs)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_samples(paths: list[Path]) -> list[dict[str, Any]]:
    """LLaVA-format samples from JSONL files or JSON arrays, through datagen's one sample reader."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if not Path(path).is_file():
            raise VisinstructError(f"held-out file not found: {path}", "generate one with `datagen generate` (see docs/evaluation.md)")
        records += list(read_sample_file(Path(path)))
    return records


def uses_random_tower(model_dir: Path) -> bool:
    """True when the run that wrote this checkpoint built a random vision tower (no hub/local tower named)."""
    for config_path in [*Path(model_dir).resolve().parent.glob("stage*/config.yaml"),
                        *Path(model_dir).resolve().parent.parent.glob("stage*/config.yaml")]:
        config = yaml.safe_load(config_path.read_text()) or {}
        if (config.get("model") or {}).get("vision_tower") in (None, ""):
            return True
    return False


class Evaluation:
    """One evaluation run over one checkpoint."""

    def __init__(self, cfg: EvalConfig) -> None:
        from datagen.coco import CocoIndex  # pycocotools: loaded here, not at import

        self.cfg = cfg
        self.out = cfg.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.index = CocoIndex(cfg.coco_root, cfg.coco_split, with_instances=True)
        self.instances_path = Path(cfg.coco_root) / "annotations" / f"instances_{cfg.coco_split}.json"
        self.trained = TrainingImages()
        self.contamination: dict[str, Any] = {"checked": cfg.check_contamination, "dropped": {}}
        self._model = None
        self.question_ids: list[str] = []

    @property
    def model(self):
        """The checkpoint, loaded on first use (a report-only run never loads it)."""
        if self._model is None:
            from train.eval.model_io import ExportedModel

            self._model = ExportedModel(self.cfg.model, self.cfg.batch_size)
        return self._model

    def clean_ids(self, ids: list[int], what: str) -> list[int]:
        """Evaluation ids without training images (refusing, or dropping with a count, per the config)."""
        if not self.cfg.check_contamination:
            return ids
        clean, dropped, self.trained = guard(ids, self.cfg.model, self.cfg.drop_contaminated, what, self.cfg.compare_with)
        self.contamination.update(training_images=len(self.trained.ids), sources=self.trained.sources)
        self.contamination["dropped"][what] = dropped
        if dropped:
            print(f"contamination guard: dropped {dropped} of {len(ids)} {what} images that were used in training",
                  file=sys.stderr)
        return clean

    def _write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        with (self.out / name).open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def pope(self) -> dict[str, Any]:
        """POPE's three samplings on clean images: accuracy, precision, recall, F1, yes-ratio each."""
        from train.eval.model_io import Prompt

        objects = CocoObjects.from_instances(self.instances_path)
        ids = self.clean_ids(sorted(objects.categories_of), "pope")
        results: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        by_sampling = {s: build_pope(objects, s, self.cfg.pope_per_image, self.cfg.pope_images, self.cfg.seed, ids)
                       for s in SAMPLINGS}
        # The samplings share their images and "yes" questions: each distinct question is asked once.
        unique = list(dict.fromkeys((q.file_name, q.question) for qs in by_sampling.values() for q in qs))
        replies = dict(zip(unique, self.model.answer([Prompt(self.cfg.images / f, text) for f, text in unique],
                                                     self.cfg.pope_tokens)))
        for sampling, questions in by_sampling.items():
            answers = [replies[(q.file_name, q.question)] for q in questions]
            predictions = [parse_yes_no(a) for a in answers]
            results[sampling] = score_pope([q.label for q in questions], predictions).as_dict()
            results[sampling]["images"] = len({q.image_id for q in questions})
            rows += [{**asdict(q), "answer": a, "parsed": p} for q, a, p in zip(questions, answers, predictions)]
            self.question_ids += [q.question_id for q in questions]
        self._write_rows("pope-answers.jsonl", rows)
        return results

    def chair(self) -> dict[str, Any]:
        """CHAIR_i / CHAIR_s of the model's detailed descriptions of clean images."""
        from train.eval.chair import DESCRIBE_PROMPT, chair_scores
        from train.eval.model_io import Prompt

        ids = self.clean_ids(self.index.image_ids(), "chair")
        if self.cfg.chair_images is not None and len(ids) > self.cfg.chair_images:
            ids = sorted(random.Random(f"chair:{self.cfg.seed}").sample(ids, self.cfg.chair_images))
        records = [self.index.record(i) for i in ids]
        texts = self.model.answer([Prompt(self.cfg.images / r.file_name, DESCRIBE_PROMPT) for r in records],
                                  self.cfg.describe_tokens)
        scores, items = chair_scores(records, texts)
        self._write_rows("chair-descriptions.jsonl", [
            {"image_id": it.image_id, "description": t, "mentioned": sorted(it.mentioned), "hallucinated": sorted(it.hallucinated)}
            for it, t in zip(items, texts)])
        self.question_ids += [f"chair-{i}" for i in ids]
        return scores

    def heldout_records(self, what: str) -> list[dict[str, Any]]:
        """Held-out samples whose images were not trained on."""
        records = [r for r in read_samples(self.cfg.heldout) if r.get("image")]
        ids = [image_id_of(str(r["image"])) for r in records]
        keep = set(self.clean_ids(sorted({i for i in ids if i is not None}), what))
        return [r for r, i in zip(records, ids) if i in keep]

    def loss(self) -> dict[str, Any]:
        """Mean answer-token cross-entropy per split and overall, with training's masking."""
        from train.eval.bench import split_of

        records = self.heldout_records("loss")
        sums: dict[str, list[float]] = {}
        for record, (total, tokens) in zip(records, self.model.answer_loss(records, self.cfg.images)):
            for key in (split_of(record), "all"):
                acc = sums.setdefault(key, [0.0, 0, 0])
                acc[0] += total
                acc[1] += tokens
                acc[2] += 1
        return {k: {"samples": n, "answer_tokens": t, "loss": s / t if t else None,
                    "perplexity": math.exp(s / t) if t else None} for k, (s, t, n) in sums.items()}

    def bench(self) -> dict[str, Any]:
        """Judged relative scores (model vs reference answer) per split."""
        from train.eval.bench import bench_items, judge_answers, relative_scores
        from train.eval.model_io import Prompt

        items = bench_items(self.heldout_records("bench"))
        if self.cfg.bench_limit is not None:
            items = items[: self.cfg.bench_limit]
        if not items:
            return {"all": {"items": 0, "judged": 0, "relative_score": None}}
        answers = self.model.answer([Prompt(self.cfg.images / it.image, it.question) for it in items], self.cfg.answer_tokens)
        cfg = self.cfg
        judge_backend = ModelOptions(backend=BackendName(cfg.judge_backend), base_url=cfg.judge_base_url).backend_name()
        backend = make_backend(judge_backend, cfg.judge_model, cfg.judge_base_url, cfg.batch_size, None)
        self.judge_model = f"{backend.name}:{backend.model}"

        def context_of(item) -> str:
            return render_context(self.index.record(image_id_of(item.image)), with_boxes=True)

        prompts = load_judge_prompts()
        judged = judge_answers(items, answers, context_of, backend, prompts,
                               cfg.judge_cache or default_cache_path(self.out))
        self._write_rows("bench-answers.jsonl", [
            {**asdict(j.item), "answer": j.answer, "reference_score": j.reference_score, "model_score": j.model_score,
             "judge": j.judge_text} for j in judged])
        self.question_ids += [f"bench-{it.sample_id}" for it in items]
        scores = relative_scores(judged)
        scores["judge"] = {"model": self.judge_model, "prompt_hash": prompts.hash}
        return scores

    def run(self) -> dict[str, Any]:
        """Every section not skipped; the report dict (also written to eval.json and eval.md)."""
        started = time.perf_counter()
        from train.eval.model_io import checkpoint_hash

        sections: dict[str, Any] = {}
        for name in SECTIONS:
            if name in self.cfg.skip or (name in ("bench", "loss") and not self.cfg.heldout):
                continue
            t0 = time.perf_counter()
            sections[name] = getattr(self, name)()
            log.info("%s done in %.1f s", name, time.perf_counter() - t0)
        notes = [RANDOM_TOWER_NOTE] if uses_random_tower(self.cfg.model) else []
        if not self.cfg.check_contamination:
            notes.append("WARNING: the contamination guard was switched off (--no-contamination-check).")
        if sections.get("bench", {}).get("judge"):
            notes.append(f"Judge: {sections['bench']['judge']['model']}; a small judge (like the embedded one) is "
                         "weak and its scores are noise; use a strong model for real comparisons.")
        data = {"instances": {"path": str(self.instances_path), "sha256": file_sha(self.instances_path)},
                "heldout": [{"path": str(p), "sha256": file_sha(p)} for p in self.cfg.heldout]}
        report = {
            "checkpoint": str(self.cfg.model), "checkpoint_hash": checkpoint_hash(self.cfg.model),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, (list, tuple)) else v)
                         for k, v in asdict(self.cfg).items()},
            "data": data, "seed": self.cfg.seed, "contamination": self.contamination,
            "questions_hash": hashlib.sha256("\n".join(self.question_ids).encode()).hexdigest()[:16],
            "metrics": flatten(sections), "sections": sections, "notes": notes,
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        (self.out / REPORT_NAME).write_text(json.dumps(report, indent=2))
        (self.out / "eval.md").write_text(markdown_table(report) + "\n")
        return report


def flatten(sections: dict[str, Any]) -> dict[str, float | int | None]:
    """The headline figures as `section/part/metric` keys (the rows of the table)."""
    metrics: dict[str, float | int | None] = {}
    for sampling, s in sections.get("pope", {}).items():
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            metrics[f"pope/{sampling}/{key}"] = s[key]
    if "chair" in sections:
        metrics["chair/chair_i"] = sections["chair"]["chair_i"]
        metrics["chair/chair_s"] = sections["chair"]["chair_s"]
    for split, s in sections.get("bench", {}).items():
        if split != "judge":
            metrics[f"bench/{split}/relative_score"] = s["relative_score"]
    for split, s in sections.get("loss", {}).items():
        metrics[f"heldout/{split}/loss"] = s["loss"]
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m train.eval.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", type=Path, help="exported checkpoint folder (e.g. runs/smoke/final)")
    target.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="two checkpoints (evaluated with these flags) or two eval.json files/folders")
    p.add_argument("--coco-root", type=Path, default=os.environ.get("COCO_ROOT"), help="COCO root (or $COCO_ROOT)")
    p.add_argument("--coco-split", default="val2017", help="evaluation split, e.g. val2017, val2014 (default val2017)")
    p.add_argument("--heldout", type=Path, nargs="*", default=[], help="held-out LLaVA-format files (bench + loss)")
    p.add_argument("--image-folder", type=Path, default=None, help="images of the held-out samples (default COCO_ROOT/SPLIT)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: <model>/../eval)")
    p.add_argument("--seed", type=int, default=0, help="seed of the POPE and CHAIR image choice (default 0)")
    p.add_argument("--pope-images", type=int, default=100, help="POPE images per sampling (paper: 500; default 100)")
    p.add_argument("--chair-images", type=int, default=50, help="images described for CHAIR (default 50)")
    p.add_argument("--bench-limit", type=int, default=None, help="at most this many benchmark questions")
    p.add_argument("--judge-backend", default="auto", choices=["auto", "local", "openai"], help="judge backend")
    p.add_argument("--judge-model", default=None, help="judge model (default: gpt-4o-mini for openai, embedded for local)")
    p.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint of the judge")
    p.add_argument("--judge-cache", type=Path, default=None, help="judge response cache (default <out>/.cache/responses.sqlite)")
    p.add_argument("--drop-contaminated", action="store_true", help="leave out evaluation images used in training")
    p.add_argument("--no-contamination-check", action="store_true", help="skip the training-overlap check (not advised)")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call (default 8)")
    p.add_argument("--describe-tokens", type=int, default=96, help="CHAIR description length limit (default 96)")
    p.add_argument("--answer-tokens", type=int, default=128, help="benchmark answer length limit (default 128)")
    p.add_argument("--list-clean-ids", type=int, default=None, metavar="N",
                   help="print N comma-separated image ids of the split the model was not trained on, and exit")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace, model: Path, out: Path | None, compare_with: list[Path] | None = None) -> EvalConfig:
    if args.coco_root is None:
        raise VisinstructError("no COCO root given", "pass --coco-root DIR or set $COCO_ROOT")
    return EvalConfig(
        model=model, coco_root=Path(args.coco_root), coco_split=args.coco_split, out=out, heldout=list(args.heldout),
        image_folder=args.image_folder, seed=args.seed, pope_images=args.pope_images, chair_images=args.chair_images,
        bench_limit=args.bench_limit, judge_backend=args.judge_backend, judge_model=args.judge_model,
        judge_base_url=args.judge_base_url, judge_cache=args.judge_cache, drop_contaminated=args.drop_contaminated,
        check_contamination=not args.no_contamination_check, skip=tuple(args.skip), batch_size=args.batch_size,
        describe_tokens=args.describe_tokens, answer_tokens=args.answer_tokens, compare_with=list(compare_with or []))


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def report_for(path: Path, args: argparse.Namespace, label: str, other: Path | None = None) -> dict[str, Any]:
    """An existing eval.json, or a fresh evaluation of a checkpoint folder (leaving out the images the other
    checkpoint of the comparison trained on too, so both answer the same questions)."""
    if is_checkpoint(path):
        out = (args.out or Path("runs/compare")) / label
        partner = [other] if other is not None and is_checkpoint(other) else []
        return Evaluation(config_from(args, path, out, partner)).run()
    return load_report(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.list_clean_ids is not None:
            cfg = config_from(args, args.model, args.out)
            cfg.drop_contaminated = True  # listing the clean ids is the point: drop, do not refuse
            ev = Evaluation(cfg)
            ids = ev.clean_ids(ev.index.image_ids(), "held-out")
            print(",".join(str(i) for i in ids[: args.list_clean_ids]))
            return 0
        if args.compare:
            first, second = args.compare
            a, b = report_for(first, args, "A", second), report_for(second, args, "B", first)
            table, diffs = compare_table(a, b)
            print(table)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "compare.md").write_text(table + "\n")
                (args.out / "compare.json").write_text(json.dumps({"A": a["checkpoint"], "B": b["checkpoint"],
                                                                   "difference": diffs}, indent=2))
            return 0
        report = Evaluation(config_from(args, args.model, args.out)).run()
        print(markdown_table(report))
        print(f"\nreport: {config_from(args, args.model, args.out).out_dir / REPORT_NAME}")
        return 0
    except VisinstructError as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        from model.errors import TrainError

        if isinstance(exc, TrainError):
            print(f"error: {terminal_text(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
