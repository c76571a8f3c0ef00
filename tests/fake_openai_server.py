"""A local chat-completions server for tests and the benchmark, with faults injected on demand.

Speaks enough of the OpenAI protocol for the openai SDK: POST /v1/chat/completions, /v1/files,
/v1/files/{id}/content and /v1/batches. Binds 127.0.0.1 only and stops itself after `lifetime_s`.
Run standalone (for the benchmark): python tests/fake_openai_server.py --latency 0.05 --port-file p.txt
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

log = logging.getLogger("fake_openai_server")

FAULTS = ("429", "500", "503", "timeout", "drop", "truncated")

# Filler sentences; each completion draws its own mix, so completions differ like real ones do.
FILLERS = (
    "The scene is captured in clear light, which makes the details easy to make out.",
    "Nothing in the picture looks staged; it reads like an ordinary moment.",
    "The composition draws the eye to the centre of the frame first.",
    "Colours in the picture are natural and fairly muted.",
    "It is likely that this was taken by someone who was simply passing by.",
    "The setting suggests a familiar, everyday place.",
    "Small details in the background hint at what happened just before.",
    "The framing is slightly off-centre, as casual photos often are.",
    "Someone might take a picture like this to remember the moment.",
    "The overall mood is calm rather than busy.",
    "A viewer would probably recognise a scene like this from their own life.",
    "The light suggests it was taken during the day.",
    "There is a sense of routine in what is shown.",
    "The angle of the shot gives a good overview of the scene.",
    "It would be easy to describe this picture to a friend in a sentence or two.",
    "The edges of the frame cut off part of the surroundings.",
)


def negative_text(context: str, absent: list[str]) -> str:
    """A negative-split answer: each absent object asked about and denied, then what the captions show."""
    caption = next((line.strip().rstrip(". ") for line in context.splitlines() if line.strip() and ":" not in line), "a scene")
    return "\n".join(
        f"Question: Is there a {obj} in this picture?\nAnswer: No, there is no {obj} in this picture. "
        f"It shows {caption[0].lower()}{caption[1:]}."
        for obj in absent[:2]
    )


def grounded_text(context: str) -> str:
    """A grounded-split answer: the first boxes of the context asked about and named with their box."""
    boxes = [line.split(": ", 1) for line in context.splitlines() if line.rstrip().endswith("]") and ": [" in line]
    return "\n".join(
        f"Question: What is in the region {box}?\nAnswer: That region shows the {name} {box}." for name, box in boxes[:2]
    )


def completion_text(context: str) -> str:
    """Three question/answer pairs (about 250 tokens) built from the context's captions plus varied filler."""
    captions = [line.strip().rstrip(". ") for line in context.splitlines() if ":" not in line]
    captions = [c for c in captions if c] or ["a scene"]
    pick = random.Random(context)
    answers = []
    for n in range(3):
        caption = captions[n % len(captions)]
        answers.append(f"{caption[0].upper()}{caption[1:]}. " + " ".join(pick.sample(FILLERS, 3)))
    questions = ("What is happening in this image?", "What stands out about the scene?", "Why might someone take this photo?")
    return "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(questions, answers))


@dataclass
class FaultPlan:
    """Which requests fail how: per-attempt probabilities (deterministic by seed), or a script for the first ones."""

    rates: dict[str, float] = field(default_factory=dict)
    script: list[str | None] = field(default_factory=list)
    seed: int = 0
    retry_after_s: float = 0.05
    timeout_sleep_s: float = 2.0

    def pick(self, serial: int, digest: str, attempt: int) -> str | None:
        if serial < len(self.script):
            return self.script[serial]
        roll = random.Random(f"{self.seed}:{digest}:{attempt}").random()
        edge = 0.0
        for fault in FAULTS:
            edge += self.rates.get(fault, 0.0)
            if roll < edge:
                return fault
        return None


@dataclass
class ServerState:
    """What the tests read back: every request seen, and the batch store."""

    requests: list[dict] = field(default_factory=list)
    attempts: Counter = field(default_factory=Counter)  # per prompt digest
    answered: Counter = field(default_factory=Counter)  # 200s with a full body, per prompt digest
    faults: Counter = field(default_factory=Counter)
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict] = field(default_factory=dict)
    polls: Counter = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return len(self.requests)


def prompt_digest(messages: list[dict]) -> str:
    """Identifies one work item by its last user message (the image context)."""
    last = messages[-1].get("content", "") if messages else ""
    return hashlib.sha1(str(last).encode()).hexdigest()[:16]


REFUSAL = "I'm sorry, but I can't see images."


def choice_text(messages: list[dict], index: int) -> str:
    """Choice `index` of a request: the first is the same whatever `n` is; later ones draw other filler sentences."""
    context = str(messages[-1].get("content", "")) if messages else ""
    system = str(messages[0].get("content", "")) if messages else ""
    absent = [line.split(":", 1)[1] for line in context.splitlines() if line.startswith("Absent objects:")]
    if absent:  # the negative split's context
        return negative_text(context, [a.strip() for a in absent[0].split(",")])
    if "regions of the image" in system and ": [" in context:  # the grounded split's prompt
        return grounded_text(context)
    return completion_text(context if index == 0 else f"{context}\n#{index}")


def completion_body(messages: list[dict], model: str, serial: int, n: int = 1) -> dict:
    """A chat.completion object whose text varies with the image context, with `n` choices (OpenAI's `n`)."""
    texts = [choice_text(messages, k) for k in range(n)]
    prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
    completion_tokens = sum(len(t) // 4 for t in texts)
    return {
        "id": f"chatcmpl-{serial}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": k, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                    for k, t in enumerate(texts)],
        "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_chars // 4 + completion_tokens},
    }


def _error(status: int, message: str, code: str, headers: dict | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error", "code": code}}
    return web.json_response(body, status=status, headers=headers)


class FakeOpenAIServer:
    """The server; use as a context manager in tests (`with FakeOpenAIServer(...) as server: server.base_url`)."""

    def __init__(self, latency_s: float = 0.0, faults: FaultPlan | None = None, api_key: str | None = None,
                 models: set[str] | None = None, ratelimit_headers: dict[str, str] | None = None,
                 batch_fail: set[str] | None = None, batch_expire: set[str] | None = None, batch_polls: int = 1,
                 lifetime_s: float = 3600.0, record: bool = True, bad_first_choice_every: int = 0) -> None:
        self.latency_s = latency_s
        self.plan = faults or FaultPlan()
        self.api_key = api_key
        self.models = models
        self.ratelimit_headers = ratelimit_headers or {}
        self.batch_fail = batch_fail or set()
        self.batch_expire = batch_expire or set()
        self.batch_polls = batch_polls
        self.lifetime_s = lifetime_s
        self.record = record
        # Best-of-N tests: the first choice of every k-th prompt (by digest) is a refusal the checks reject.
        self.bad_first_choice_every = bad_first_choice_every
        self.state = ServerState()
        self.port = 0
        self._serial = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # ---- HTTP handlers -------------------------------------------------------------------------------------------
    def _auth_failure(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided", "invalid_api_key")
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._auth_failure(request)) is not None:
            return denied
        payload = await request.json()
        model = payload.get("model", "")
        if self.models is not None and model not in self.models:
            return _error(404, f"The model `{model}` does not exist", "model_not_found")
        messages = payload.get("messages") or []
        serial = self._serial
        self._serial += 1
        digest = prompt_digest(messages)
        self.state.attempts[digest] += 1
        fault = self.plan.pick(serial, digest, self.state.attempts[digest])
        if self.record:
            self.state.requests.append({"digest": digest, "fault": fault, "t": time.monotonic()})
        if fault:
            self.state.faults[fault] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "429":
            return _error(429, "Rate limit reached", "rate_limit_exceeded", {"Retry-After": str(self.plan.retry_after_s)})
        if fault in ("500", "503"):
            return _error(int(fault), "The server had an error", "server_error")
        if fault == "timeout":
            await asyncio.sleep(self.plan.timeout_sleep_s)
        if fault == "drop":
            request.transport.abort()
            return web.Response(status=500)
        body = completion_body(messages, model, serial, int(payload.get("n") or 1))
        if self.bad_first_choice_every and int(digest, 16) % self.bad_first_choice_every == 0:
            body["choices"][0]["message"]["content"] = REFUSAL
        body = json.dumps(body).encode()
        if fault == "truncated":
            return web.Response(body=body[: len(body) // 2], content_type="application/json")
        self.state.answered[digest] += 1
        return web.Response(body=body, content_type="application/json", headers=self.ratelimit_headers)

    async def upload_file(self, request: web.Request) -> web.Response:
        if (denied := self._auth_failure(request)) is not None:
            return denied
        reader = await request.multipart()
        data, name, purpose = b"", "upload.jsonl", "batch"
        async for part in reader:
            if part.name == "file":
                name = part.filename or name
                data = await part.read()
            elif part.name == "purpose":
                purpose = (await part.read()).decode()
        file_id = f"file-{len(self.state.files) + 1}"
        self.state.files[file_id] = data
        return web.json_response(self._file_object(file_id, name, purpose))

    def _file_object(self, file_id: str, name: str, purpose: str) -> dict:
        return {"id": file_id, "object": "file", "bytes": len(self.state.files[file_id]), "created_at": int(time.time()),
                "filename": name, "purpose": purpose, "status": "processed"}

    async def file_content(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if file_id not in self.state.files:
            return _error(404, f"No such File object: {file_id}", "not_found")
        return web.Response(body=self.state.files[file_id], content_type="application/octet-stream")

    async def create_batch(self, request: web.Request) -> web.Response:
        if (denied := self._auth_failure(request)) is not None:
            return denied
        payload = await request.json()
        input_id = payload.get("input_file_id")
        if input_id not in self.state.files:
            return _error(400, f"input file {input_id} not found", "invalid_file")
        batch_id = f"batch_{len(self.state.batches) + 1}"
        batch = {"id": batch_id, "object": "batch", "endpoint": payload.get("endpoint"), "errors": None,
                 "input_file_id": input_id, "completion_window": payload.get("completion_window", "24h"),
                 "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": payload.get("metadata")}
        self.state.batches[batch_id] = batch
        return web.json_response(batch)

    def _finish_batch(self, batch: dict) -> None:
        """Answer every line of the input file: results, error lines, or nothing for expired items."""
        outputs, errors, expired = [], [], False
        lines = [json.loads(line) for line in self.state.files[batch["input_file_id"]].decode().splitlines() if line.strip()]
        for n, line in enumerate(lines):
            cid = line["custom_id"]
            if cid in self.batch_expire:
                expired = True
                continue
            if cid in self.batch_fail:
                errors.append({"id": f"batch_req_{n}", "custom_id": cid, "response": {"status_code": 500, "request_id": f"r{n}",
                               "body": {"error": {"message": "server error", "type": "server_error"}}}, "error": None})
                continue
            self.state.answered[prompt_digest(line["body"]["messages"])] += 1
            outputs.append({"id": f"batch_req_{n}", "custom_id": cid, "response": {"status_code": 200, "request_id": f"r{n}",
                            "body": completion_body(line["body"]["messages"], line["body"]["model"], n)}, "error": None})
        for kind, rows in (("output_file_id", outputs), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{len(self.state.files) + 1}"
                self.state.files[file_id] = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
                batch[kind] = file_id
        batch["status"] = "expired" if expired else "completed"
        batch["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}

    async def get_batch(self, request: web.Request) -> web.Response:
        batch = self.state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "No such batch", "not_found")
        self.state.polls[batch["id"]] += 1
        if batch["status"] not in ("completed", "expired"):
            if self.state.polls[batch["id"]] >= self.batch_polls:
                self._finish_batch(batch)
            else:
                batch["status"] = "in_progress"
        return web.json_response(batch)

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/files", self.upload_file)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        return app

    async def serve(self, port: int = 0, ready: threading.Event | None = None) -> None:
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        if ready is not None:
            ready.set()
        deadline = time.monotonic() + self.lifetime_s
        try:
            while not self._stopped.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FakeOpenAIServer":
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve(0, ready)), daemon=True)
        self._thread.start()
        if not ready.wait(120):  # a hang guard: starting takes milliseconds
            raise RuntimeError("fake server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--lifetime", type=float, default=900.0, help="stop after this many seconds")
    args = parser.parse_args()
    server = FakeOpenAIServer(latency_s=args.latency, lifetime_s=args.lifetime, record=False)
    ready = threading.Event()

    def announce() -> None:
        ready.wait(30)
        if args.port_file:
            tmp = args.port_file.with_suffix(".tmp")
            tmp.write_text(str(server.port))
            tmp.replace(args.port_file)

    threading.Thread(target=announce, daemon=True).start()
    try:
        asyncio.run(server.serve(args.port, ready))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
