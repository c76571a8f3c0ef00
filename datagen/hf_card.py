"""The dataset card (README.md with the Hub's YAML header), made from the exported data and the run manifests."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datagen.hf_dataset import DATA_FOLDER, HF_SPLIT, META_COLUMNS, USAGE_FIELDS, HfExportReport
from datagen.sample import OutputLayout, read_manifest
from datagen.urls import redact_value

CARD_KEY = "visinstruct"  # our figures in the YAML header, under one key the Hub ignores
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"))
LLAVA_BIBTEX = """@inproceedings{liu2023llava,
  title     = {Visual Instruction Tuning},
  author    = {Liu, Haotian and Li, Chunyuan and Wu, Qingyang and Lee, Yong Jae},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}"""
COCO_BIBTEX = """@inproceedings{lin2014coco,
  title     = {Microsoft COCO: Common Objects in Context},
  author    = {Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
               Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2014}
}"""


@dataclass
class Provenance:
    """What the manifests and files beside the inputs say about how the samples were made."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    rejects_files: list[Path] = field(default_factory=list)


def collect_provenance(inputs: list[Path]) -> Provenance:
    """Run manifests (X.runs.jsonl) and rejects files (X.rejects.jsonl) beside each input file."""
    prov = Provenance()
    names = {p.resolve() for p in inputs if p.is_file()}
    for path in inputs:
        if not path.is_file():
            continue
        layout = OutputLayout(path)
        if layout.rejects.is_file() and layout.rejects.resolve() not in names and layout.rejects not in prov.rejects_files:
            prov.rejects_files.append(layout.rejects)
        if layout.runs.is_file() and layout.runs != path:
            for _, entry in read_manifest(layout.runs):  # typed: a field of the wrong type names its line
                settings = run_settings(entry.model_dump(exclude_none=True))
                # Manifests written before redaction may hold endpoint credentials: never publish them.
                prov.runs.append(redact_value({"manifest": layout.runs.name, **settings}))
    return prov


def run_settings(entry: dict[str, Any]) -> dict[str, Any]:
    """A manifest line's settings as one flat dict, whichever format wrote it.

    Current manifests hold `{shard, images, prompt_hash, backend, model, ..., command, config: {source: {...},
    model: {...}, sampling: {...}, ...}, stats}` (the resolved backend and model at the top level win over the
    config's `auto` / unset ones); older ones held every setting at the top level.
    """
    config = entry.get("config")
    if not isinstance(config, dict):
        return dict(entry)
    flat: dict[str, Any] = {}
    for group in config.values():
        if isinstance(group, dict):
            flat.update(group)
    flat.update({k: v for k, v in config.items() if not isinstance(v, dict)})
    flat.update({k: v for k, v in entry.items() if k != "config" and v is not None})
    return flat


def _command(run: dict[str, Any]) -> str:
    """The command of a run: as recorded, else rebuilt from the manifest's settings (flag = setting)."""
    if isinstance(run.get("command"), str):
        return run["command"]
    flags = ["datagen", "generate"]
    for key in ("split", "coco_root", "coco_split", "limit", "backend", "model", "base_url", "temperature", "top_p",
                "max_tokens", "seed", "repetition_penalty", "concurrency", "shard"):
        if run.get(key) is not None:
            flags += [f"--{key.replace('_', '-')}", str(run[key])]
    return shlex.join(flags) + "   # rebuilt from the run manifest"


def size_category(n: int) -> str:
    return next((label for limit, label in SIZE_CATEGORIES if n < limit), "n>10M")


def generation_summary(report: HfExportReport, rejected_stats: dict[str, Any] | None) -> dict[str, Any]:
    """Per split: accepted (in the inputs), rejected (rejects files; None: no rejects file), acceptance, reasons."""
    out: dict[str, Any] = {}
    for name in sorted(set(report.available) | {s for s in rejected_stats or {} if s != "all"}):
        accepted = int(report.available.get(name, 0))
        if rejected_stats is None:
            out[name] = {"accepted": accepted, "rejected": None, "acceptance_rate": None, "reject_reasons": {}}
            continue
        rej = rejected_stats.get(name, {})
        rejected = int(rej.get("rejected", 0))
        out[name] = {
            "accepted": accepted, "rejected": rejected,
            "acceptance_rate": round(accepted / (accepted + rejected), 4) if accepted + rejected else None,
            "reject_reasons": dict(rej.get("reject_reasons", {})),
        }
    return out


def features_yaml(embed_images: bool) -> list[dict[str, Any]]:
    """dataset_info.features in the Hub's YAML form."""
    string = {"dtype": "string"}
    return [
        {"name": "id", **string}, {"name": "image", "dtype": "image" if embed_images else "string"},
        {"name": "conversations", "list": [{"name": "from", **string}, {"name": "value", **string}]},
        {"name": "split", **string},
        *[{"name": name, "dtype": kind} for name, kind in META_COLUMNS.items()],
        {"name": "usage", "struct": [{"name": f, "dtype": "int64"} for f in USAGE_FIELDS]},
        {"name": "extra", **string},
    ]


def card_header(report: HfExportReport, stats: dict[str, Any], prov: Provenance, rejected_stats: dict[str, Any] | None,
                embed_images: bool, export_command: str, pretty_name: str) -> dict[str, Any]:
    """The YAML header: Hub metadata, configs (all, and one per split), and our figures under `visinstruct`."""
    splits = sorted(report.per_split)
    configs = [{"config_name": "default", "default": True,
                "data_files": [{"split": HF_SPLIT, "path": f"{DATA_FOLDER}/*/{HF_SPLIT}-*.parquet"}]}]
    configs += [{"config_name": s, "data_files": [{"split": HF_SPLIT, "path": f"{DATA_FOLDER}/{s}/{HF_SPLIT}-*.parquet"}]}
                for s in splits]
    runs = [{
        "split": r.get("split"), "model": r.get("model"), "backend": r.get("backend"), "prompt_hash": r.get("prompt_hash"),
        "finished_at": r.get("finished_at"), "accepted": (r.get("stats") or {}).get("accepted"),
        "rejected": (r.get("stats") or {}).get("rejected"), "command": _command(r),
    } for r in prov.runs]
    hashes = {s: sorted(h) for s, h in sorted(report.prompt_hashes.items())}
    for r in prov.runs:
        if r.get("split") and r.get("prompt_hash"):
            hashes.setdefault(r["split"], [])
            if r["prompt_hash"] not in hashes[r["split"]]:
                hashes[r["split"]] = sorted([*hashes[r["split"]], r["prompt_hash"]])
    models = dict(report.writer_models.most_common())
    for r in prov.runs:
        if r.get("model") and r["model"] not in models:
            models[r["model"]] = 0  # named by a manifest, no accepted sample carries it
    return {
        "license": "cc-by-4.0",
        "language": ["en"],
        "pretty_name": pretty_name,
        "task_categories": ["visual-question-answering", "image-text-to-text"],
        "tags": ["llava", "visual-instruction-tuning", "synthetic", "coco"],
        "size_categories": [size_category(report.written)],
        "configs": configs,
        "dataset_info": {
            "features": features_yaml(embed_images),
            "splits": [{"name": HF_SPLIT, "num_bytes": report.bytes_written, "num_examples": report.written}],
            "download_size": report.file_bytes,
            "dataset_size": report.bytes_written,
        },
        CARD_KEY: {
            "samples": {s: int(report.per_split[s]) for s in splits},
            "stats": stats,
            "generation": generation_summary(report, rejected_stats),
            "writer_models": models,
            "prompt_hashes": hashes,
            "runs": runs,
            "export_command": export_command,
            "images": "embedded" if embed_images else "paths",
        },
    }


def _code(text: Any) -> str:
    """Untrusted text (model names, hashes, split names) as inline Markdown code that cannot break out."""
    return "`" + " ".join(str(text).replace("`", "'").split()) + "`"


def _block_line(text: Any) -> str:
    """One line inside a fenced block: no newline or fence can end the block early."""
    return " ".join(str(text).split()).replace("`", "'")


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else (f"{value:.3f}" if isinstance(value, float) else str(value))


def card_body(header: dict[str, Any], embed_images: bool, load_from: str) -> str:
    """The card's Markdown: summary, figures, provenance, licence, loading, citation."""
    ours = header[CARD_KEY]
    stats, gen = ours["stats"], ours["generation"]
    lines = [f"# {_block_line(header['pretty_name']).lstrip('#')}", "",
             "Synthetic visual instruction data in LLaVA's format (conversation, detail description, complex "
             "reasoning), written by a language model from MS-COCO captions and object boxes with "
             "visinstruct. Each row is one image with a multi-turn conversation.", "",
             "## Splits and figures", "",
             "| split | samples | acceptance | reject reasons | CHAIR_i | CHAIR_s | answer words (mean) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for name in sorted(set(ours["samples"]) | set(gen)):
        s, g = stats.get(name, {}), gen.get(name, {})
        reasons = ", ".join(f"{_code(k)} {v}" for k, v in g.get("reject_reasons", {}).items()) or "-"
        lines.append(f"| {_code(name)} | {ours['samples'].get(name, 0)} | {_fmt(g.get('acceptance_rate'), pct=True)} | {reasons} "
                     f"| {_fmt(s.get('chair_i'))} | {_fmt(s.get('chair_s'))} | {s.get('answer_words', {}).get('mean', 0):.1f} |")
    lines += ["", "Acceptance is accepted / (accepted + rejected) over the input files and the rejects files beside "
              "them (n/a when there was no rejects file); CHAIR (object hallucination; lower is better) needs the COCO annotations at export time "
              "(n/a otherwise). Every figure is also in the YAML header under `visinstruct`.", "",
              "## How it was made", ""]
    if ours["writer_models"]:
        lines.append("Writer model(s): " + ", ".join(f"{_code(m)} ({n} samples)" if n else _code(m)
                                                     for m, n in ours["writer_models"].items()) + ".")
    else:
        lines.append("Writer model(s): not recorded in the samples or manifests.")
    if ours["prompt_hashes"]:
        lines.append("Prompt hashes: " + "; ".join(f"{_code(s)}: {', '.join(_code(h) for h in hs)}"
                                                   for s, hs in ours["prompt_hashes"].items()) + ".")
    lines += ["", "Commands, in order:", "", "```bash"]
    lines += [_block_line(run["command"]) for run in ours["runs"]] or ["# (no run manifest beside the input files)"]
    lines += [_block_line(ours["export_command"]), "```", "",
              "## Licence", "",
              "The COCO annotations the prompts were built from are licensed CC BY 4.0 by the COCO Consortium; "
              "each COCO image keeps its own Flickr licence. The generated text is also subject to the terms of "
              "use of the model(s) that wrote it (listed above): those terms are the publisher's to check and "
              "add here before sharing.", "",
              "## Loading", "", "```python", "from datasets import load_dataset", "",
              f'ds = load_dataset("{load_from}")  # all splits: one "train" split with a "split" column',
              f'detail = load_dataset("{load_from}", "detail")  # one split (a config per split)', "```", "",
              "Columns: `id`, `image` (" + ("the image itself, as an `Image` feature" if embed_images else
                                          "a path relative to the image root given at export, e.g. COCO's train2017/") +
              "), `conversations` (LLaVA's list of `{from, value}`), `split`, the generation metadata `model`, "
              "`backend`, `prompt_hash`, `seed`, `usage`, `finish_reason`, and `extra` (any other fields, as JSON).", "",
              "## Citation", "", "```bibtex", LLAVA_BIBTEX, "", COCO_BIBTEX, "```", ""]
    return "\n".join(lines)


def render_card(header: dict[str, Any], embed_images: bool, load_from: str) -> str:
    """README.md text: the YAML header between --- lines, then the Markdown body (load_from: repo id or folder)."""
    # json round trip: plain types only (Counter, tuples), so safe_dump writes standard YAML.
    plain = json.loads(json.dumps(header))
    return "---\n" + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=120) + "---\n\n" + card_body(plain, embed_images, load_from)
