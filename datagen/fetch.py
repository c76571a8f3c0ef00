"""Download COCO annotations and the first N images of a split from the official site (or a mirror)."""
from __future__ import annotations

import logging
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from datagen.coco import CocoIndex
from datagen.errors import VisinstructError

log = logging.getLogger(__name__)

# Annotation archives on the official site, per split year.
ARCHIVES = {"2017": "annotations_trainval2017.zip", "2014": "annotations_trainval2014.zip"}
CHUNK = 1 << 16


def _year(split: str) -> str:
    year = split[-4:]
    if year not in ARCHIVES or not split[:-4] in ("train", "val"):
        raise VisinstructError(f"unknown COCO split {split!r}", "use train2017, val2017, train2014 or val2014")
    return year


def download(url: str, dest: Path, progress: Progress | None = None, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest`, resuming a previous partial download (`dest.part`) with an HTTP Range."""
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part file is already complete
            part.replace(dest)
            return dest
        raise VisinstructError(f"download of {url} failed: HTTP {exc.code}", "check --base-url or try again later") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise VisinstructError(f"cannot download {url}: {reason}", "check the network or --base-url; rerun to resume") from None
    with response:
        if response.status != 206:
            have = 0  # server ignored the range: start over
        total = response.length + have if response.length is not None else None
        task = progress.add_task(dest.name, total=total, completed=have) if progress else None
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "ab" if have else "wb") as fh:
            try:
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    if progress is not None:
                        progress.advance(task, len(chunk))
            except (TimeoutError, OSError) as exc:
                raise VisinstructError(f"download of {url} broke off: {exc}", "rerun the same command to resume") from None
        if progress is not None:
            progress.remove_task(task)
    if total is not None and part.stat().st_size != total:
        raise VisinstructError(f"download of {url} is incomplete", "rerun the same command to resume")
    part.replace(dest)
    return dest


def extract_annotations(archive: Path, split: str, dest_root: Path) -> None:
    """Take captions_<split>.json and instances_<split>.json out of the archive, CRC-checked."""
    wanted = [f"annotations/captions_{split}.json", f"annotations/instances_{split}.json"]
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for name in wanted:
                if name not in names:
                    raise VisinstructError(f"{archive.name} has no {name}", "check --split and the archive")
                target = dest_root / name
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                # ZipExtFile verifies the member's CRC-32 as it reads: a corrupt archive raises here.
                with zf.open(name) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                tmp.replace(target)
    except zipfile.BadZipFile as exc:
        archive.unlink(missing_ok=True)
        raise VisinstructError(f"{archive} is corrupt ({exc})", "it was removed; rerun to download it again") from None


def _verify_image(path: Path, width: int, height: int) -> bool:
    """An image counts as downloaded when it decodes at the size the annotations give."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.size == (width, height)
    except Exception:
        return False


def fetch_coco(split: str, images: int, dest: Path, base_url: str, verify: bool = True) -> Path:
    """Annotations for `split` plus its first `images` captioned images (by id) under `dest`."""
    year = _year(split)
    base = base_url.rstrip("/")
    dest = Path(dest)
    archive = dest / "downloads" / ARCHIVES[year]
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()) as progress:
        download(f"{base}/annotations/{ARCHIVES[year]}", archive, progress)
        extract_annotations(archive, split, dest)
        # The index checks the file as every reader does (and later commands reuse it).
        index = CocoIndex(dest, split, with_instances=False)
        infos = [index.captions.imgs[i] for i in index.image_ids() if i in index.captions.imgs][:images]
        task = progress.add_task(f"{split} images", total=len(infos))
        for info in infos:
            target = dest / split / info["file_name"]
            if target.exists() and verify and not _verify_image(target, info["width"], info["height"]):
                target.unlink()
            if not target.exists():
                download(f"{base}/{split}/{info['file_name']}", target)
                if verify and not _verify_image(target, info["width"], info["height"]):
                    target.unlink()
                    raise VisinstructError(
                        f"{info['file_name']} does not decode at {info['width']}x{info['height']}",
                        "rerun to download it again, or check --base-url",
                    )
            progress.advance(task)
    return dest
