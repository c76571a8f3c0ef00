"""A loopback HTTP server standing in for the Hugging Face Hub: repo creation, LFS upload, commit, download.

It implements only the endpoints huggingface_hub calls for create_repo + upload_folder (legacy LFS transfer,
Xet disabled) and for snapshot_download of a dataset, and it records every request so a test can check what
the client sent. Files committed become the repo's content, so a push can be read back with hf://.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeHub:
    """State shared with the handler: repos, uploaded LFS objects, and the request log."""

    token: str
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # "datasets/org/name" -> path -> content
    private: dict[str, bool] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # method, path, lower-cased headers
    commits: list[dict[str, Any]] = field(default_factory=list)
    base_url: str = ""

    def commit_sha(self, repo: str) -> str:
        files = self.repos.get(repo, {})
        digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())).encode())
        return digest.hexdigest()


def validate_card(content: str) -> list[str]:
    """A model of the Hub's card check (the real rules are the Hub's): the header parses, known keys are well typed."""
    import yaml

    if not content.startswith("---\n"):
        return ["no YAML header"]
    try:
        header = yaml.safe_load(content[4:content.index("\n---", 3)])
    except (ValueError, yaml.YAMLError) as exc:
        return [f"YAML does not parse: {exc}"]
    errors = []
    if not isinstance(header.get("license"), str):
        errors.append('"license" must be a string')
    for key in ("language", "task_categories", "tags", "size_categories"):
        if not (isinstance(header.get(key), list) and all(isinstance(v, str) for v in header[key])):
            errors.append(f'"{key}" must be a list of strings')
    for config in header.get("configs", []):
        if not isinstance(config.get("config_name"), str) or not config.get("data_files"):
            errors.append(f"config {config!r} needs config_name and data_files")
    return errors


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # a file object streamed by the client
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
            data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _route(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            hub.requests.append((method, path, {k.lower(): v for k, v in self.headers.items()}))
            body = self._body() if method in ("POST", "PUT") else b""
            # Upload URLs stand for presigned storage URLs: no Hub token there (the client must not send it).
            if method in ("POST", "PUT") and not path.startswith("/lfs-upload/") and not self._authorized():
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            if method == "POST" and path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req.get('type', 'model')}s/{req.get('organization') or ''}/{req['name']}".replace("s//", "s/")
                hub.repos.setdefault(repo, {})
                hub.private[repo] = bool(req.get("private")) or req.get("visibility") == "private"
                return self._send(200, {"url": f"{hub.base_url}/{repo}", "name": repo})
            if method == "POST" and path == "/api/validate-yaml":
                errors = validate_card(json.loads(body)["content"])
                return self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
            m = re.fullmatch(r"/api/(datasets)/([^/]+/[^/]+)/preupload/([^/]+)", path)
            if method == "POST" and m:
                files = json.loads(body)["files"]
                # Like the Hub: binary files (Parquet) go through LFS, the text card is a regular file.
                return self._send(200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                                   "uploadMode": "regular" if f["path"].endswith(".md") else "lfs"}
                                                  for f in files]})
            m = re.fullmatch(r"/(datasets)/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if method == "POST" and m:
                objects = json.loads(body)["objects"]
                return self._send(200, {"transfer": "basic", "objects": [
                    {"oid": o["oid"], "size": o["size"],
                     "actions": {"upload": {"href": f"{hub.base_url}/lfs-upload/{o['oid']}"}}} for o in objects]})
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if method == "PUT" and m:
                if hashlib.sha256(body).hexdigest() != m.group(1):
                    return self._send(400, {"error": "sha256 mismatch"})
                hub.lfs_objects[m.group(1)] = body
                return self._send(200, {})
            m = re.fullmatch(r"/api/(datasets)/([^/]+/[^/]+)/commit/([^/]+)", path)
            if method == "POST" and m:
                repo = f"{m.group(1)}/{m.group(2)}"
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = hub.repos.setdefault(repo, {})
                for line in lines:
                    kind, value = line["key"], line["value"]
                    if kind == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif kind == "lfsFile":
                        files[value["path"]] = hub.lfs_objects[value["oid"]]
                    elif kind == "deletedFile":
                        files.pop(value["path"], None)
                    elif kind == "deletedFolder":
                        for p in [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]:
                            files.pop(p)
                hub.commits.append({"repo": repo, "lines": lines})
                sha = hub.commit_sha(repo)
                return self._send(200, {"commitUrl": f"{hub.base_url}/{repo}/commit/{sha}", "commitOid": sha,
                                        "pullRequestUrl": None})
            m = re.fullmatch(r"/api/(datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if method == "GET" and m:
                repo = f"{m.group(1)}/{m.group(2)}"
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
                return self._send(200, {"id": m.group(2), "sha": hub.commit_sha(repo), "private": hub.private.get(repo, False),
                                        "siblings": [{"rfilename": p} for p in sorted(hub.repos[repo])]})
            m = re.fullmatch(r"/api/(datasets)/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
            if method == "GET" and m:
                repo = f"{m.group(1)}/{m.group(2)}"
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
                return self._send(200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                        for p, b in sorted(hub.repos[repo].items())])
            m = re.fullmatch(r"/(datasets)/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if method in ("GET", "HEAD") and m:
                repo, file = f"{m.group(1)}/{m.group(2)}", m.group(4)
                content = hub.repos.get(repo, {}).get(file)
                if content is None:
                    return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"},
                                      head=method == "HEAD")
                etag = hashlib.sha256(content).hexdigest()
                return self._send(200, raw=content, head=method == "HEAD", headers={
                    "ETag": f'"{etag}"', "X-Repo-Commit": hub.commit_sha(repo)})
            return self._send(404, {"error": f"not implemented in the fake Hub: {method} {path}"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

    return Handler


class FakeHubServer:
    """Runs FakeHub on 127.0.0.1 in a thread; use as a context manager."""

    def __init__(self, token: str) -> None:
        self.hub = FakeHub(token=token)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.hub.base_url = self.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
