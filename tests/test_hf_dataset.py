"""Hugging Face datasets in and out: export --format hf, the card, the loopback Hub push, and reading it back."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from datagen.cli import main
from datagen.hf_dataset import HfExportOptions, arrow_schema, from_row, to_row
from datagen.hf_export import write_hf_folder
from datagen.sample import read_samples
from fake_hub_server import FakeHubServer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = FIXTURES / "good_samples.jsonl"
SPLITS = ("conversation", "detail", "reasoning")


def run(capsys, *args: str) -> tuple[int, str, str]:
    """`datagen ARGS` in this process; exit code, stdout, stderr."""
    with mock.patch.object(sys, "argv", ["datagen", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def generated_run(folder: Path) -> list[Path]:
    """What `generate` leaves per split: samples with meta, a rejects file and a run manifest beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, split in enumerate(SPLITS):
        meta = {"backend": "openai", "prompt_hash": f"hash-{split}", "seed": 0, "model": "Qwen2.5-72B-Instruct",
                "usage": {"prompt_tokens": 900 + k, "completion_tokens": 200}, "finish_reason": "stop"}
        recs = [{**r, "meta": meta} for r in read_jsonl(GOOD) if r["split"] == split]
        recs[0]["meta"] = {**meta, "model": "gpt-4o-mini", "latency_s": 1.5}  # an unknown meta field
        path = write_jsonl(folder / f"{split}.jsonl", recs)
        rejects = [{**recs[1], "reject_reasons": ["refusal"], "raw": "I cannot"},
                   {"id": "000000999999", "image": "000000999999.jpg", "split": split, "reject_reasons": ["truncated"],
                    "raw": "Question: Why?"}][: 1 + k % 2]
        write_jsonl(folder / f"{split}.rejects.jsonl", rejects)
        manifest = {"finished_at": "2026-11-28T03:00:00Z", "split": split, "model": "Qwen2.5-72B-Instruct",
                    "backend": "openai", "prompt_hash": f"hash-{split}",
                    "command": f"datagen generate --split {split} --coco-root coco --model Qwen2.5-72B-Instruct",
                    "stats": {"accepted": len(recs), "rejected": len(rejects)}}
        (folder / f"{split}.runs.jsonl").write_text(json.dumps(manifest) + "\n")
        paths.append(path)
    return paths


def card_header_of(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---", 3)])


# --- round trip --------------------------------------------------------------------------------


def test_round_trip_through_datasets_with_embedded_images(capsys, coco_root, tmp_path):
    inputs = generated_run(tmp_path / "data")
    out = tmp_path / "hf"
    code, stdout, err = run(capsys, "export", *inputs, "--format", "hf", "--out", out, "--embed-images",
                            "--image-root", coco_root / "val2017", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    source = [r for p in inputs for r in read_jsonl(p)]
    assert report["written"] == len(source) == 22 and report["skipped_rejected"] == 0
    assert sorted(report["shards"]) == [f"data/{s}/train-00000-of-00001.parquet" for s in SPLITS]

    ds = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert list(ds) == ["train"] and ds["train"].num_rows == 22
    assert isinstance(ds["train"].features["image"], datasets.Image)
    rows = ds["train"].cast_column("image", datasets.Image(decode=False))
    by_key = {(r["split"], r["id"]): r for r in source}
    for row in rows:
        rec = from_row(dict(row))
        assert rec == by_key[(rec["split"], rec["id"])]  # every field, meta and unknown meta fields included
    for row in ds["train"].select(range(0, 22, 5)):
        with Image.open(coco_root / "val2017" / by_key[(row["split"], row["id"])]["image"]) as original:
            assert np.array_equal(np.asarray(row["image"]), np.asarray(original))


def test_folder_loads_through_the_cards_configs(capsys, tmp_path):
    inputs = generated_run(tmp_path / "data")
    out = tmp_path / "hf"
    assert run(capsys, "export", *inputs, "--format", "hf", "--out", out)[0] == 0
    cache = str(tmp_path / "cache")
    everything = datasets.load_dataset(str(out), cache_dir=cache)
    assert everything["train"].num_rows == 22 and everything["train"].features["image"] == datasets.Value("string")
    detail = datasets.load_dataset(str(out), "detail", cache_dir=cache)["train"]
    assert set(detail["split"]) == {"detail"} and detail.num_rows == 7


@st.composite
def records(draw):
    """Sample records as files hold them: LLaVA keys, our split and meta, and anything else a user added."""
    json_value = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=6,
    )
    turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]), "value": st.text(max_size=20)},
                                 optional={"weight": st.integers(0, 1)})
    meta = st.dictionaries(
        st.sampled_from(["model", "backend", "prompt_hash", "seed", "finish_reason", "usage", "latency_s", "x"]),
        json_value | st.text(max_size=6) | st.integers() | st.fixed_dictionaries(
            {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)}), max_size=8)
    rec = draw(st.fixed_dictionaries(
        {},
        optional={"conversations": st.lists(turn, max_size=4), "id": st.text(max_size=12) | st.integers() | st.none(), "image": st.text(max_size=12) | st.none(),
                  "split": st.sampled_from(["detail", None]) | st.integers(), "meta": meta | json_value,
                  "context": st.text(max_size=10), "reject_reasons": json_value},
    ))
    return rec


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=records(), embed=st.booleans())
def test_rows_give_back_the_record_exactly(rec, embed):
    """to_row -> Arrow (the Parquet schema) -> from_row is the identity, apart from the split the export resolved."""
    image = rec.get("image")
    cell = ({"bytes": b"\xff\xd8", "path": image} if embed else image) if isinstance(image, str) else None
    table = pa.Table.from_pylist([to_row(rec, "detail", cell)], schema=arrow_schema(embed))
    back = from_row(table.to_pylist()[0])
    expected = dict(rec)
    if expected.get("split") is None or isinstance(expected.get("split"), str):
        expected["split"] = "detail"
    assert back == expected


# --- options and safety ------------------------------------------------------------------------


def test_image_paths_relative_to_image_root_and_format_wins_over_extension(capsys, coco_root, tmp_path):
    recs = [r for r in read_jsonl(GOOD) if r["split"] == "detail"]
    src = write_jsonl(tmp_path / "detail.jsonl", [*recs, {**recs[0], "id": "gone", "image": "000000999999.jpg"}])
    out = tmp_path / "looks-like.json"
    code, stdout, err = run(capsys, "export", src, "--format", "hf", "--out", out, "--image-root", coco_root,
                            "--images-dir", coco_root / "val2017", "--json")
    assert code == 0, err
    assert out.is_dir() and (out / "README.md").is_file()
    assert json.loads(stdout)["missing_images"] == 1
    rows = list(read_samples(out))
    assert len(rows) == len(recs) and all(r["image"].startswith("val2017/") for r in rows)
    assert all((coco_root / r["image"]).is_file() for r in rows)


def test_mix_picks_the_same_samples_as_the_json_export(capsys, tmp_path):
    paths = []
    for split in SPLITS:
        recs = [{"id": f"{i:012d}", "image": f"{i:012d}.jpg", "split": split,
                 "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": f"{split} {i}."}]}
                for i in range(30)]
        paths.append(write_jsonl(tmp_path / f"{split}.jsonl", recs))
    as_json, as_hf = tmp_path / "mix.json", tmp_path / "mix-hf"
    code, json_report, _ = run(capsys, "export", *paths, "--out", as_json, "--seed", "5", "--keep-meta", "--json")
    assert code == 0
    code, stdout, _ = run(capsys, "export", *paths, "--format", "hf", "--out", as_hf, "--mix", "llava", "--seed", "5", "--json")
    assert code == 0
    picked_json = {(r["split"], r["conversations"][1]["value"]) for r in json.loads(as_json.read_text())}
    picked_hf = {(r["split"], r["conversations"][1]["value"]) for r in read_samples(as_hf)}
    assert picked_hf == picked_json
    assert json.loads(stdout)["per_split"] == json.loads(json_report)["per_split"] == {"conversation": 22, "detail": 8, "reasoning": 30}


def test_never_overwrites_a_folder_that_is_not_an_export(capsys, tmp_path):
    src = write_jsonl(tmp_path / "detail.jsonl", [r for r in read_jsonl(GOOD) if r["split"] == "detail"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "export", src, "--format", "hf", "--out", mine)
    assert code == 2 and err.startswith("error: ") and "not an earlier export" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "hf"
    assert run(capsys, "export", src, "--format", "hf", "--out", out)[0] == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**read_jsonl(src)[0], "split": "../escape"}])
    code, _, err = run(capsys, "export", src, bad, "--format", "hf", "--out", out)
    assert code == 2 and "cannot name a dataset config" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the earlier export is intact
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    code, _, err = run(capsys, "export", src, "--format", "hf", "--out", out, "--embed-images")
    assert code == 2 and "--image-root" in err
    code, _, err = run(capsys, "export", src, "--out", tmp_path / "x.json", "--push-to-hub", "me/x")
    assert code == 2 and "need --format hf" in err


def test_shards_split_by_size_and_row_groups_bound_memory(tmp_path, coco_root):
    detail = [r for r in read_jsonl(GOOD) if r["split"] == "detail"]
    # Three copies under their own ids (export keeps one sample per split and id).
    src = write_jsonl(tmp_path / "detail.jsonl", [{**r, "id": f"{r['id']}-{k}"} for k in range(3) for r in detail])
    options = HfExportOptions(embed_images=True, image_root=coco_root / "val2017", rows_per_group=2,
                              shard_bytes=300_000)
    report = write_hf_folder([src], tmp_path / "out", options)
    assert report.written == 21 and len(report.shards) > 2
    n = len(report.shards)
    assert report.shards == [f"data/detail/train-{k:05d}-of-{n:05d}.parquet" for k in range(n)]
    import pyarrow.parquet as pq

    assert all(pq.ParquetFile(tmp_path / "out" / s).metadata.row_group(0).num_rows <= 2 for s in report.shards)
    assert [r["id"] for r in read_samples(tmp_path / "out")] == [r["id"] for r in read_jsonl(src)]


# --- the card ----------------------------------------------------------------------------------


def test_card_header_parses_and_its_figures_are_datagen_stats(capsys, coco_root, tmp_path):
    inputs = generated_run(tmp_path / "data")
    out = tmp_path / "hf"
    code, _, err = run(capsys, "export", *inputs, "--format", "hf", "--out", out, "--coco-root", coco_root)
    assert code == 0, err
    header = card_header_of(out)
    ours = header["visinstruct"]
    stats_of_folder = json.loads(run(capsys, "stats", out, "--coco-root", coco_root, "--json")[1])
    stats_of_inputs = json.loads(run(capsys, "stats", *inputs, "--coco-root", coco_root, "--json")[1])
    assert ours["stats"] == stats_of_folder == stats_of_inputs
    assert ours["stats"]["detail"]["chair_i"] is not None
    rejects = [p.with_name(p.stem + ".rejects.jsonl") for p in inputs]
    stats_of_rejects = json.loads(run(capsys, "stats", *rejects, "--json")[1])
    for split in SPLITS:
        gen = ours["generation"][split]
        assert gen["rejected"] == stats_of_rejects[split]["rejected"]
        assert gen["reject_reasons"] == stats_of_rejects[split]["reject_reasons"]
        assert gen["accepted"] == ours["samples"][split] == stats_of_folder[split]["samples"]
        assert gen["acceptance_rate"] == round(gen["accepted"] / (gen["accepted"] + gen["rejected"]), 4)
    assert header["license"] == "cc-by-4.0" and header["dataset_info"]["splits"][0]["num_examples"] == 22
    assert ours["writer_models"] == {"Qwen2.5-72B-Instruct": 19, "gpt-4o-mini": 3}
    assert ours["prompt_hashes"] == {s: [f"hash-{s}"] for s in SPLITS}
    assert [r["command"] for r in ours["runs"]] == [
        f"datagen generate --split {s} --coco-root coco --model Qwen2.5-72B-Instruct" for s in SPLITS]
    assert "--format hf" in ours["export_command"]
    assert {c["config_name"] for c in header["configs"]} == {"default", *SPLITS}
    body = (out / "README.md").read_text()
    for phrase in ("CC BY 4.0", "terms of use of the model", "Visual Instruction Tuning",
                   "Common Objects in Context", "datagen generate --split detail"):
        assert phrase in body


def test_card_without_rejects_files_says_acceptance_unknown(capsys, tmp_path):
    src = write_jsonl(tmp_path / "detail.jsonl", [r for r in read_jsonl(GOOD) if r["split"] == "detail"])
    assert run(capsys, "export", src, "--format", "hf", "--out", tmp_path / "hf")[0] == 0
    ours = card_header_of(tmp_path / "hf")["visinstruct"]
    assert ours["generation"]["detail"] == {"accepted": 7, "rejected": None, "acceptance_rate": None, "reject_reasons": {}}
    assert ours["stats"]["detail"]["chair_i"] is None  # no --coco-root


# --- other commands on the folder --------------------------------------------------------------


def test_check_stats_review_take_the_folder(capsys, coco_root, tmp_path):
    inputs = generated_run(tmp_path / "data")
    out = tmp_path / "hf"
    assert run(capsys, "export", *inputs, "--format", "hf", "--out", out, "--embed-images",
               "--image-root", coco_root / "val2017")[0] == 0
    from_folder = json.loads(run(capsys, "check", out, "--coco-root", coco_root, "--json")[1])
    from_files = [json.loads(run(capsys, "check", p, "--coco-root", coco_root, "--json")[1]) for p in inputs]
    assert from_folder["total"] == sum(s["total"] for s in from_files) == 22
    assert from_folder["accepted"] == sum(s["accepted"] for s in from_files)
    accepted = tmp_path / "accepted.jsonl"
    assert run(capsys, "check", out, "--out-accepted", accepted)[0] == 0
    assert {r["id"] for r in read_jsonl(accepted)} <= {r["id"] for p in inputs for r in read_jsonl(p)}
    code, stdout, _ = run(capsys, "review", out, "--coco-root", coco_root, "--html", tmp_path / "page.html")
    assert code == 0 and stdout.startswith("22 samples")
    code, stdout, _ = run(capsys, "review", out, "--split", "detail", "--limit", "1")
    assert code == 0 and "split detail" in stdout
    code, _, err = run(capsys, "stats", tmp_path / "empty-folder-that-is-a-file")
    assert code == 2
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "stats", tmp_path / "empty")
    assert code == 2 and "has no Parquet sample files" in err


def test_trainer_reads_the_folder_with_embedded_images(capsys, coco_root, tmp_path, monkeypatch):
    from train.data import read_records

    responses = tmp_path / "responses.sqlite"
    responses.write_bytes(b"")
    monkeypatch.setenv("VISINSTRUCT_CACHE", str(responses))  # the response cache file: not where images go
    monkeypatch.setenv("VISINSTRUCT_IMAGE_CACHE", str(tmp_path / "images"))
    src = write_jsonl(tmp_path / "detail.jsonl", [r for r in read_jsonl(GOOD) if r["split"] == "detail"])
    out = tmp_path / "hf"
    assert run(capsys, "export", src, "--format", "hf", "--out", out, "--embed-images",
               "--image-root", coco_root / "val2017")[0] == 0
    records = read_records([str(out)])
    originals = {r["id"]: r for r in read_jsonl(src)}
    assert len(records) == len(originals)
    for rec in records:
        path = Path(rec["image"])
        assert path.is_absolute() and path.parent == (tmp_path / "images").resolve()
        assert path.read_bytes() == (coco_root / "val2017" / originals[rec["id"]]["image"]).read_bytes()
        assert rec["conversations"] == originals[rec["id"]]["conversations"]
    assert read_records([str(out)]) == records  # the second read finds the images already written


# --- the Hub (a loopback server stands in for it) ----------------------------------------------


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    token = "hf_loopbackTestToken0123456789"
    with FakeHubServer(token) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("VISINSTRUCT_IMAGE_CACHE", str(tmp_path / "hf-images"))  # the trainer's extracted images
        # huggingface_hub reads these at import time; the test process imported it already.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield server


def test_push_to_hub_commits_the_folder_and_hf_ids_read_it_back(capsys, fake_hub, coco_root, tmp_path):
    inputs = generated_run(tmp_path / "data")
    out = tmp_path / "hf"
    code, stdout, err = run(capsys, "export", *inputs, "--format", "hf", "--out", out, "--embed-images",
                            "--image-root", coco_root / "val2017", "--push-to-hub", "my-org/my-llava-data", "--private",
                            "--json")
    assert code == 0, err
    hub = fake_hub.hub
    assert json.loads(stdout)["commit_url"].startswith(fake_hub.url + "/datasets/my-org/my-llava-data/commit/")
    repo = hub.repos["datasets/my-org/my-llava-data"]
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert repo == local and hub.private["datasets/my-org/my-llava-data"] is True
    commit = hub.commits[-1]["lines"]
    assert {line["value"]["path"] for line in commit if line["key"] == "lfsFile"} == {p for p in local if p.endswith(".parquet")}
    token = hub.token
    for method, path, headers in hub.requests:
        if path.startswith("/lfs-upload/"):
            assert "Authorization" not in headers  # storage URLs never see the Hub token
        elif method in ("POST", "PUT"):
            assert headers.get("authorization") == f"Bearer {token}", (method, path)
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert token.encode() not in file.read_bytes(), f"token written to {file}"

    # hf://org/name wherever a sample file is taken: stats, and the trainer's data list.
    via_hub = json.loads(run(capsys, "stats", "hf://my-org/my-llava-data", "--json")[1])
    assert via_hub == json.loads(run(capsys, "stats", out, "--json")[1])
    from train.config import load_config
    from train.data import read_records

    cfg = load_config("smoke-cpu", ["stage2.data=[hf://my-org/my-llava-data]"])
    assert cfg.stage2.data == ["hf://my-org/my-llava-data"] and len(read_records(cfg.stage2.data)) == 22
    # A Hub dataset of LLaVA JSON files (as liuhaotian/LLaVA-Instruct-150K is): read from those, split from the name.
    llava = [{k: r[k] for k in ("id", "image", "conversations")} for r in read_jsonl(GOOD) if r["split"] == "detail"]
    hub.repos["datasets/liuhaotian/llava-like"] = {"detail_23k.json": json.dumps(llava).encode(), "README.md": b"# x\n"}
    stats = json.loads(run(capsys, "stats", "hf://liuhaotian/llava-like", "--json")[1])
    assert list(stats) == ["detail"] and stats["detail"]["samples"] == len(llava)
    code, _, err = run(capsys, "stats", "hf://my-org/no-such-data")
    assert code == 2 and err.startswith("error: cannot get hf://my-org/no-such-data") and len(err.splitlines()) == 1


def test_push_errors_are_one_line(capsys, fake_hub, monkeypatch, tmp_path):
    src = write_jsonl(tmp_path / "detail.jsonl", [r for r in read_jsonl(GOOD) if r["split"] == "detail"])
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, _, err = run(capsys, "export", src, "--format", "hf", "--out", tmp_path / "a", "--push-to-hub", "me/data")
    assert code == 2 and "HTTP 401" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "a" / "README.md").is_file()  # the export is kept when the push fails
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    code, _, err = run(capsys, "export", src, "--format", "hf", "--out", tmp_path / "b", "--push-to-hub", "me/data")
    assert code == 2 and "no Hugging Face token" in err
    assert not (tmp_path / "b").exists()  # checked before exporting
    code, _, err = run(capsys, "export", src, "--format", "hf", "--out", tmp_path / "c", "--push-to-hub", "not-a-repo-id")
    assert code == 2 and "not a repo id" in err


def test_card_of_a_real_generate_run_records_its_exact_command(capsys, coco_root, tmp_path, monkeypatch):
    from fake_openai_server import FakeOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    commands = []
    with FakeOpenAIServer() as server:
        for split in SPLITS:
            args = ["generate", "--split", split, "--coco-root", str(coco_root), "--limit", "3", "--backend", "openai",
                    "--base-url", server.base_url, "--model", "writer-7b", "--out", str(tmp_path / f"{split}.jsonl"),
                    "--no-cache"]
            code, _, err = run(capsys, *args)
            assert code == 0, err
            commands.append("datagen " + " ".join(args))
    inputs = [tmp_path / f"{s}.jsonl" for s in SPLITS]
    out = tmp_path / "hf"
    assert run(capsys, "export", *inputs, "--format", "hf", "--out", out)[0] == 0
    ours = card_header_of(out)["visinstruct"]
    assert [r["command"] for r in ours["runs"]] == commands
    written = sum(len(read_jsonl(p)) for p in inputs)
    assert sum(ours["samples"].values()) == written and set(ours["writer_models"]) == {"writer-7b"}
    assert all(len(ours["prompt_hashes"][s]) == 1 for s in ours["samples"])
    for split, gen in ours["generation"].items():
        rejects = tmp_path / f"{split}.rejects.jsonl"
        assert gen["rejected"] == (len(read_jsonl(rejects)) if rejects.exists() else 0)


def test_untrusted_text_cannot_break_the_cards_markdown(capsys, tmp_path):
    recs = [r for r in read_jsonl(GOOD) if r["split"] == "detail"]
    evil = "m`\n```\n<script>alert(1)</script>\n# Heading"
    recs[0] = {**recs[0], "meta": {"model": evil, "prompt_hash": "h`\n```"}}
    src = write_jsonl(tmp_path / "detail.jsonl", recs)
    (tmp_path / "detail.runs.jsonl").write_text(json.dumps({"split": "detail", "command": "datagen x\n```\n# injected"}) + "\n")
    assert run(capsys, "export", src, "--format", "hf", "--out", tmp_path / "hf")[0] == 0
    body = (tmp_path / "hf" / "README.md").read_text().split("\n---\n", 1)[1]
    fences = [line for line in body.splitlines() if line.startswith("```")]
    assert len(fences) == 6  # bash, python and bibtex blocks, each opened and closed once
    assert not [line for line in body.splitlines() if line.startswith("# ") and "injected" in line or "Heading" == line[2:]]
    assert card_header_of(tmp_path / "hf")["visinstruct"]["writer_models"] == {evil: 1}  # the YAML keeps it exactly


def test_card_reads_current_and_old_manifests(tmp_path):
    """A manifest line as `generate` writes it now (config nested, command on top) and an old flat one."""
    from datagen.cli.generate import manifest
    from datagen.engine.work import RunStats
    from datagen.hf_card import _command, collect_provenance
    from datagen.run_config import GenerateConfig
    from datagen.sample import OutputLayout
    from datagen.sink import write_manifest

    src = write_jsonl(tmp_path / "detail.jsonl", [r for r in read_jsonl(GOOD) if r["split"] == "detail"])
    config = GenerateConfig.model_validate({"source": {"split": "detail", "coco_root": "coco", "limit": 3},
                                            "model": {"backend": "auto"}, "sampling": {"seed": 4}})
    layout = OutputLayout(src)
    write_manifest(layout, manifest(config, images=3, prompt_hash="ph", backend="openai", model="m-7b",
                                    concurrency=8, cache=None, command=None), RunStats(accepted=3, rejected=1))
    write_manifest(layout, manifest(config, images=3, prompt_hash="ph", backend="openai", model="m-7b",
                                    concurrency=8, cache=None, command="datagen generate --split detail"), RunStats())
    with open(layout.runs, "a") as fh:  # a manifest line of the earlier, flat format
        fh.write(json.dumps({"split": "detail", "model": "old-1b", "backend": "local", "seed": 1,
                             "coco_root": "c", "stats": {"accepted": 2}}) + "\n")
    new, recorded, old = collect_provenance([src]).runs
    assert (new["split"], new["model"], new["backend"], new["prompt_hash"]) == ("detail", "m-7b", "openai", "ph")
    assert new["stats"]["accepted"] == 3
    assert _command(new).startswith("datagen generate --split detail --coco-root coco --coco-split val2017 --limit 3 "
                                    "--backend openai "
                                    "--model m-7b") and "--seed 4" in _command(new)
    assert _command(recorded) == "datagen generate --split detail"
    assert (old["model"], old["backend"]) == ("old-1b", "local")
    assert _command(old).startswith("datagen generate --split detail --coco-root c --backend local --model old-1b")
