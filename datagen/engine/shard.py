"""Stable 1/N slices of the image ids, and the check-and-join of shard outputs."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from datagen.errors import VisinstructError
from datagen.inputs import InputError, parse_json, short_json
from datagen.jsonl import iter_jsonl
from datagen.sample import ManifestEntry, OutputLayout, read_manifest

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` of `count`, 1-based: 1/4 .. 4/4."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "ShardSpec":
        match = _SPEC.match(text or "")
        if not match:
            raise VisinstructError(f"--shard must look like K/N, got {text!r}", "e.g. --shard 1/4 on the first of four machines")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 1 <= index <= count:
            raise VisinstructError(f"--shard {text}: K must be between 1 and N", f"use 1/{max(count, 1)} .. {max(count, 1)}/{max(count, 1)}")
        return cls(index, count)

    def contains(self, image_id: int) -> bool:
        """Hash-based so every shard gets a fair share whatever the id pattern, and stable across machines."""
        return shard_of(image_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(image_id: int, count: int) -> int:
    """The 1-based shard an image id belongs to when the run is split `count` ways."""
    digest = hashlib.blake2b(str(int(image_id)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count + 1


@dataclass
class MergeReport:
    """What `datagen merge` found and wrote."""

    samples: int
    rejects: int
    shards: list[str]
    missing: list[str]
    doubled: list[str]


def _shard_of_file(path: Path) -> tuple[ShardSpec | None, int | None]:
    """The shard spec and assigned-image count from the last run manifest beside a shard output.

    The manifest is read through the input layer (datagen.sample.read_manifest): a field of the wrong type
    is a user error naming the manifest's line.
    """
    manifest = OutputLayout(path).runs
    if not manifest.exists():
        return None, None
    last: tuple[int, ManifestEntry] | None = None
    for last in read_manifest(manifest):
        pass
    if last is None or not last[1].shard:
        return None, None
    lineno, entry = last
    try:
        return ShardSpec.parse(entry.shard), entry.images
    except VisinstructError:
        raise InputError(manifest, f'"shard" is {short_json(entry.shard)}, not "K/N"',
                         f"fix that line of the run manifest, or delete {manifest.name} to merge without its shard check",
                         lineno) from None


def _complete_record(line: str) -> bool:
    """A last line without its newline: kept only if it is a whole record (else a killed writer's half line)."""
    try:
        return isinstance(parse_json(line, "-"), dict)
    except InputError:
        return False


def _rejects(path: Path) -> Path:
    return OutputLayout(Path(path)).rejects


def merge_shards(inputs: list[Path], out: Path, allow_missing: bool = False) -> MergeReport:
    """Join shard outputs (and their rejects) into `out`, refusing doubled ids and, unless allowed, missing ones."""
    if not inputs:
        raise VisinstructError("no shard outputs given", "pass the shard JSONL files, e.g. data/detail.shard-*-of-4.jsonl")
    if Path(out).resolve() in {Path(p).resolve() for p in inputs}:
        raise VisinstructError(f"--out {out} is one of the inputs", "write the merged file elsewhere")
    specs: dict[int, Path] = {}
    counts: set[int] = set()
    seen: dict[str, Path] = {}
    doubled: list[str] = []
    missing: list[str] = []
    for path in inputs:
        path = Path(path)
        if not path.exists():
            raise VisinstructError(f"shard output not found: {path}", "check the file names")
        spec, assigned = _shard_of_file(path)
        ids_here = 0
        for source in (path, _rejects(path)):
            if not source.exists():
                continue
            # Inputs are only read: a killed run's half-written last line is skipped, not cut from the file.
            for record in iter_jsonl(source, skip_partial_tail=True):
                sid = str(record.get("id"))
                ids_here += 1
                if sid in seen:
                    doubled.append(sid)
                seen[sid] = path
                if spec is not None and sid.isdigit() and not spec.contains(int(sid)):
                    raise VisinstructError(f"{path} holds id {sid}, which belongs to another shard than {spec}",
                                           "merge only outputs written with --shard")
        if spec is not None:
            if spec.index in specs:
                raise VisinstructError(f"shard {spec} appears twice ({specs[spec.index]} and {path})", "pass each shard once")
            specs[spec.index] = path
            counts.add(spec.count)
            if assigned is not None and ids_here < assigned:
                missing.append(f"{path}: {assigned - ids_here} of {assigned} images not done (rerun that shard)")
    if len(counts) > 1:
        raise VisinstructError(f"the inputs were split different ways ({sorted(counts)})", "merge shards of one run only")
    if counts:
        total = counts.pop()
        absent = sorted(set(range(1, total + 1)) - set(specs))
        if absent:
            missing.append(f"shard(s) {', '.join(f'{k}/{total}' for k in absent)} not given")
    if doubled:
        raise VisinstructError(f"{len(doubled)} id(s) appear more than once, e.g. {doubled[0]}", "remove the extra copies before merging")
    if missing and not allow_missing:
        raise VisinstructError("incomplete: " + "; ".join(missing), "finish those shards, or pass --allow-missing")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = rejects = 0
    tmp_out, tmp_rej = out.with_suffix(".jsonl.partial"), _rejects(out).with_suffix(".jsonl.partial")
    with open(tmp_out, "w", encoding="utf-8") as fo, open(tmp_rej, "w", encoding="utf-8") as fr:
        for path in inputs:
            for source, fh in ((Path(path), fo), (_rejects(Path(path)), fr)):
                if source.exists():
                    with open(source, encoding="utf-8") as src:
                        for line in src:
                            if line.strip() and (line.endswith("\n") or _complete_record(line)):
                                fh.write(line if line.endswith("\n") else line + "\n")
                                if fh is fo:
                                    samples += 1
                                else:
                                    rejects += 1
    # Rename at the end so a half-merged file never sits under the final name.
    tmp_out.replace(out)
    tmp_rej.replace(_rejects(out))
    return MergeReport(samples, rejects, [str(s) for s in sorted(specs)], missing, doubled)
