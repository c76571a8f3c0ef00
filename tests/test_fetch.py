"""`datagen coco fetch` against a local HTTP server that serves a small official-layout archive."""
from __future__ import annotations

import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest

from datagen.coco import CocoIndex
from datagen.errors import VisinstructError
from datagen.fetch import fetch_coco

IDS = [139, 802, 11813]


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from `server.files` (url path -> bytes), honouring single `bytes=N-` ranges."""

    def do_GET(self):  # noqa: N802 (http.server naming)
        self.server.log.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture()
def coco_server(coco_root, tmp_path):
    """A mirror of images.cocodataset.org holding a 3-image val2017 slice of coco-mini."""
    files: dict[str, bytes] = {}
    archive = tmp_path / "annotations_trainval2017.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for kind in ("captions", "instances"):
            data = json.loads((coco_root / "annotations" / f"{kind}_val2017.json").read_text())
            data["images"] = [i for i in data["images"] if i["id"] in IDS]
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] in IDS]
            zf.writestr(f"annotations/{kind}_val2017.json", json.dumps(data))
    files["/annotations/annotations_trainval2017.zip"] = archive.read_bytes()
    for image_id in IDS:
        name = f"{image_id:012d}.jpg"
        files[f"/val2017/{name}"] = (coco_root / "val2017" / name).read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.files, server.log = files, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_fetch_gives_a_readable_coco_root(coco_server, tmp_path):
    dest = tmp_path / "coco"
    fetch_coco("val2017", images=2, dest=dest, base_url=base(coco_server))
    index = CocoIndex(dest, "val2017")
    assert index.image_ids() == IDS
    assert sorted(p.name for p in (dest / "val2017").iterdir()) == ["000000000139.jpg", "000000000802.jpg"]
    requests_before = len(coco_server.log)
    fetch_coco("val2017", images=2, dest=dest, base_url=base(coco_server))
    assert len(coco_server.log) == requests_before  # everything already there: nothing downloaded again


def test_fetch_resumes_a_partial_archive_with_a_range_request(coco_server, tmp_path):
    dest = tmp_path / "coco"
    body = coco_server.files["/annotations/annotations_trainval2017.zip"]
    part = dest / "downloads" / "annotations_trainval2017.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(body[: len(body) // 2])
    fetch_coco("val2017", images=1, dest=dest, base_url=base(coco_server))
    assert ("/annotations/annotations_trainval2017.zip", f"bytes={len(body) // 2}-") in coco_server.log
    assert (dest / "downloads" / "annotations_trainval2017.zip").read_bytes() == body


def test_fetch_rejects_corrupt_image_and_missing_files(coco_server, tmp_path):
    coco_server.files["/val2017/000000000139.jpg"] = b"not a jpeg"
    with pytest.raises(VisinstructError, match="does not decode"):
        fetch_coco("val2017", images=1, dest=tmp_path / "a", base_url=base(coco_server))
    with pytest.raises(VisinstructError, match="HTTP 404"):
        fetch_coco("val2014", images=1, dest=tmp_path / "b", base_url=base(coco_server))
    with pytest.raises(VisinstructError, match="unknown COCO split"):
        fetch_coco("test2099", images=1, dest=tmp_path / "c", base_url=base(coco_server))


def test_fetch_unreachable_mirror_is_a_user_error(tmp_path):
    with pytest.raises(VisinstructError, match="cannot download"):
        fetch_coco("val2017", images=1, dest=tmp_path, base_url="http://127.0.0.1:9")
