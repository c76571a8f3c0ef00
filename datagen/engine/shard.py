"""Stable 1/N slices of the image ids, and the check-and-join of shard outputs."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from datagen.errors import VisinstructError
from datagen.inputs import InputError, parse_json, short_json
from datagen.jsonl import iter_jsonl
from datagen.outputs import AtomicFile, commit_together, require_file_target
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
    images_assigned: int | None = None  # images the shards' runs were given, when every input has a manifest

    @property
    def images_done(self) -> int:
        return self.samples + self.rejects


_NAME_SPEC = re.compile(r"\.shard-(\d+)-of-(\d+)\.jsonl$")


def _spec_from_name(path: Path) -> ShardSpec | None:
    """The shard a default output name states: data/detail.shard-2-of-3.jsonl -> 2/3 (None for other names)."""
    match = _NAME_SPEC.search(Path(path).name)
    if not match:
        return None
    try:
        return ShardSpec.parse(f"{match.group(1)}/{match.group(2)}")
    except VisinstructError:
        return None


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
    """Join shard outputs (and their rejects) into `out`, refusing doubled ids and, unless allowed, anything that
    makes the merge partial: a shard not given, images a shard has not done, or an input whose shard or
    completeness cannot be told (no run manifest beside it). The inputs are only read; `out` and its rejects
    file are each replaced whole (datagen.outputs.AtomicFile), or left as they were if the merge fails."""
    if not inputs:
        raise VisinstructError("no shard outputs given", "pass the shard JSONL files, e.g. data/detail.shard-*-of-4.jsonl")
    out = require_file_target(out)
    targets = {out.resolve(), _rejects(out).resolve()}
    for path in inputs:
        if {Path(path).resolve(), _rejects(Path(path)).resolve()} & targets:
            raise VisinstructError(f"--out {out} would overwrite the input {path} (or its rejects file)",
                                   "write the merged file elsewhere")
    specs: dict[int, Path] = {}
    counts: set[int] = set()
    seen: dict[str, Path] = {}
    doubled: list[str] = []
    missing: list[str] = []
    assigned_total: int | None = 0
    for path in inputs:
        path = Path(path)
        if not path.is_file():
            raise VisinstructError(f"shard output not found: {path}", "check the file names")
        spec, assigned = _shard_of_file(path)
        manifest = OutputLayout(path).runs
        if spec is None:
            spec = _spec_from_name(path)
        if assigned is None:
            assigned_total = None
            if not manifest.exists():
                missing.append(f"{path}: no run manifest ({manifest.name}), so whether all its images are done "
                               "is unknown (a run killed before its end writes none; rerun that shard to finish it)")
            else:
                missing.append(f"{path}: its run manifest {manifest.name} names no shard and image count")
        elif assigned_total is not None:
            assigned_total += assigned
        if spec is None:
            missing.append(f"{path}: not known to be a shard (its manifest names none and its name is not "
                           "*.shard-K-of-N.jsonl)")
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
    total = counts.pop() if counts else 0
    if total:
        absent = sorted(set(range(1, total + 1)) - set(specs))
        if absent:
            missing.append(f"shard(s) {', '.join(f'{k}/{total}' for k in absent)} of {total} not among the inputs")
    if doubled:
        raise VisinstructError(f"{len(doubled)} id(s) appear more than once, e.g. {doubled[0]}", "remove the extra copies before merging")
    if missing and not allow_missing:
        raise VisinstructError("incomplete: " + "; ".join(missing),
                               "finish those shards, or pass --allow-missing to merge what there is")
    samples = rejects = 0
    files = [AtomicFile(out)]
    try:
        files.append(AtomicFile(_rejects(out)))
        fo, fr = files
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
    except BaseException:
        for f in files:
            f.abort()
        raise
    commit_together(*files)  # both files on disk before either name changes
    shards = [str(ShardSpec(k, total)) for k in sorted(specs)] if specs else []
    return MergeReport(samples, rejects, shards, missing, doubled, assigned_total)
