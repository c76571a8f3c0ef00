"""One way of writing outputs: the output lock, whole files written atomically, lines appended safely, and every
write error turned into one user error.

- `OutputLock`: an exclusive lock on a run's output (`<out>.lock` beside it, holding pid, host and start time).
  The kernel holds it (`flock`), so a run killed with -9 leaves no lock behind that blocks the rerun.
- `atomic_write` / `AtomicFile`: a whole-file output is written to a temporary file beside its target, flushed
  to disk, and renamed over the target only on success; a failure leaves the old file as it was and no
  temporary file behind.
- `LineAppender`: appends whole lines to an output that a run owns (under its lock); a failed write is cut back
  to the last complete line, so the file stays valid and a rerun resumes from it.
- `OutputWriteError`: `cannot write <path>: <reason>; <what to do>`, raised by all of the above for any
  `OSError`, whichever thread the write happened in (the live engine stops the run on it).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from datagen.errors import VisinstructError

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to its pid file alone
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".lock"
TMP_SUFFIX = ".tmp"
# Errors that mean "this filesystem has no working flock" (some network and FUSE filesystems): the lock then
# relies on its pid file (see OutputLock._acquire_by_pid_file).
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


class OutputWriteError(VisinstructError):
    """An output (or the response cache) could not be written; what was written before is valid."""

    def __init__(self, path: Path | str, reason: str, hint: str) -> None:
        super().__init__(f"cannot write {path}: {reason}", hint)
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):  # crosses process boundaries whole (a Ray worker's cache write, the judge's process)
        return (type(self), (self.path, self.reason, self.hint))


def write_error(path: Path | str, exc: BaseException, resume: bool = False) -> OutputWriteError:
    """The user error for a failed write of `path`; `resume`: the command can be rerun to carry on."""
    if isinstance(exc, OutputWriteError):
        return exc
    code = getattr(exc, "errno", None)
    reason = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).strip()
    again = "then rerun the same command (what was written is kept)" if resume else "then run the command again"
    if code in _FULL:
        hint = f"free disk space (or write elsewhere), {again}"
    elif code in _DENIED:
        hint = f"make {Path(path).parent} writable (or write elsewhere), {again}"
    elif code == errno.EISDIR:
        hint = "pass a file path, not a folder"
    else:
        hint = f"check the disk and the path, {again}"
    return OutputWriteError(path, reason, hint)


def require_file_target(path: Path | str, flag: str = "--out") -> Path:
    """The output path if it can name a file; a folder (or a path under a file) is a user error."""
    path = Path(path)
    if path.is_dir():
        raise VisinstructError(f"{flag} {path} is a folder", f"pass a file path for {flag}, e.g. {path / 'out.jsonl'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise VisinstructError(f"{flag} {path}: {parent} is a file, not a folder", f"pass another {flag}")
            break
    return path


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a power loss after it keeps the new name); best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the rename itself has happened
    finally:
        os.close(fd)


# ---- whole files -------------------------------------------------------------------------------------------------


class AtomicFile:
    """A new version of `path`, written to a temporary file beside it; `commit()` renames it over `path`.

    `abort()` (or leaving a `with` block by an exception) deletes the temporary file and leaves `path` alone.
    Write errors raise `OutputWriteError` naming `path`.
    """

    def __init__(self, path: Path | str, mode: str = "w", flag: str = "--out") -> None:
        self.path = require_file_target(path, flag)
        _make_parent(self.path)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TMP_SUFFIX, dir=self.path.parent)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self.tmp = Path(name)
        binary = "b" in mode
        self._fh: IO[Any] = os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""}))
        self.done = False

    def write(self, data: Any) -> None:
        try:
            self._fh.write(data)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def finish(self) -> None:
        """Flush and fsync the temporary file (the data is on disk, not yet under the target's name)."""
        if self.done or self._fh.closed:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def commit(self) -> Path:
        """Finish, then rename over the target; returns the target."""
        if self.done:
            return self.path
        self.finish()
        try:
            if self.path.is_dir():  # made a folder while we wrote: renaming would fail obscurely
                raise IsADirectoryError(errno.EISDIR, "is a folder")
            # Keep the old file's permissions (mkstemp makes 0600 files).
            mode = self.path.stat().st_mode & 0o7777 if self.path.exists() else 0o666 & ~_umask()
            os.chmod(self.tmp, mode)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None
        self.done = True
        fsync_folder(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; the target stays as it was."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def commit_together(*files: Any) -> None:
    """Finish every file (all data on disk), then rename each over its target: a failure while finishing leaves
    every target as it was (a command's outputs change together, e.g. check's accepted and rejected files).
    Each of `files` has finish(), commit() and abort() (AtomicFile, datagen.sample.SampleWriter)."""
    try:
        for f in files:
            f.finish()
        for f in files:
            f.commit()
    finally:
        for f in files:
            f.abort()  # nothing for a committed file


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "w", flag: str = "--out") -> Iterator[AtomicFile]:
    """`with atomic_write(path) as fh: fh.write(...)`: the target changes only if the block finishes."""
    with AtomicFile(path, mode, flag) as fh:
        yield fh


def write_text_atomic(path: Path | str, text: str, flag: str = "--out") -> Path:
    """Replace `path` with `text` atomically."""
    with AtomicFile(path, "w", flag) as fh:
        fh.write(text)
    return Path(path)


def write_bytes_atomic(path: Path | str, data: bytes, flag: str = "--out") -> Path:
    """Replace `path` with `data` atomically."""
    with AtomicFile(path, "wb", flag) as fh:
        fh.write(data)
    return Path(path)


# ---- appended lines ----------------------------------------------------------------------------------------------


class LineAppender:
    """Appends whole lines to a file its caller owns; each `append` is all or nothing.

    Raw `os.write` calls (no Python buffer that could re-send half a batch on close); if one fails the file is
    cut back to where the batch began, so it ends in a complete line whatever the error.
    """

    def __init__(self, path: Path | str, fsync: bool = False) -> None:
        self.path = require_file_target(path)
        _make_parent(self.path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_error(self.path, exc, resume=True) from None
        self._fsync = fsync

    def append(self, data: str | bytes) -> None:
        blob = data.encode("utf-8") if isinstance(data, str) else data
        if not blob:
            return
        start = None
        try:
            start = os.fstat(self._fd).st_size
            view = memoryview(blob)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)  # cutting frees space, so it works on a full disk too
            raise write_error(self.path, exc, resume=True) from None

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "LineAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def append_line(path: Path | str, record: dict[str, Any]) -> None:
    """Append one JSON line (a run manifest entry) in one write."""
    with LineAppender(path) as out:
        out.append(json.dumps(record, default=str) + "\n")


# ---- the output lock ---------------------------------------------------------------------------------------------

# The output locks this process holds: lock file -> [descriptor, holders]. Process-wide by nature (a lock belongs
# to a process): a second OutputLock on the same output in this process shares the first (the CLI holds it for
# the whole command, the sink again while it writes), and a forked child (the judge's worker process) closes
# its copies at once, so the lock goes with this process and never lingers in a child that outlives it.
_HELD: dict[str, list[int]] = {}


def _close_held_in_child() -> None:
    for fd, _ in list(_HELD.values()):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def lock_path(target: Path | str) -> Path:
    """The lock file of an output: data/detail.jsonl -> data/detail.jsonl.lock."""
    target = Path(target)
    return target.with_name(target.name + LOCK_SUFFIX)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _holder_text(info: dict[str, Any] | None) -> str:
    if not info:
        return "another run (its lock file is still being written)"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


class OutputLocked(VisinstructError):
    """Another run holds the output's lock."""

    def __init__(self, target: Path, holder: dict[str, Any] | None, stale_hint: str = "") -> None:
        super().__init__(
            f"{target} is being written by another run ({_holder_text(holder)})",
            stale_hint or "wait for that run to finish (or stop it), or write to another --out",
        )
        self.holder = holder


class OutputLock:
    """An exclusive lock on one output (the samples file stands for all the files beside it).

    `with OutputLock(out):` raises `OutputLocked` naming the holder if another run has it. The lock
    file holds {"pid", "host", "started"} of the holder and is removed on release. A lock left by a
    killed run never blocks: the kernel released its flock when the process died (on filesystems without
    flock, a pid file naming a dead process on this host is taken over).
    """

    def __init__(self, target: Path | str) -> None:
        self.target = require_file_target(target)
        self.path = lock_path(self.target)
        self._fd = -1
        self.info: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> "OutputLock":
        if self.held:
            return self
        key = os.path.abspath(self.path)
        shared = _HELD.get(key)
        if shared is not None:  # this process holds it already (see _HELD)
            shared[1] += 1
            self._fd = shared[0]
            self.info = read_lock_info(self.path) or {}
            return self
        _make_parent(self.path)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            if fcntl is None:
                self._acquire_by_pid_file()
            else:
                self._acquire_by_flock()
        except OSError as exc:
            raise write_error(self.path, exc) from None
        _HELD[key] = [self._fd, 1]
        return self

    def _acquire_by_flock(self) -> None:
        for _ in range(20):  # retried only while other runs release and remove the file under our hands
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputLocked(self.target, read_lock_info(self.path)) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    if created:
                        self.path.unlink(missing_ok=True)
                    self._acquire_by_pid_file()
                    return
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released and removed this file between our open and our lock
                os.close(fd)
                continue
            self._fd = fd
            self._write_info()
            return
        raise OutputLocked(self.target, read_lock_info(self.path))

    def _acquire_by_pid_file(self) -> None:
        """Without flock: create the file exclusively; take over one naming a dead process on this host."""
        for _ in range(3):
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = read_lock_info(self.path)
                if info and info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
                        and not _pid_alive(info["pid"]):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # a stale lock from a killed run
                    continue
                hint = (f"if that run is gone, delete {self.path} and rerun" if info and info.get("host") != socket.gethostname()
                        else "")
                raise OutputLocked(self.target, info, hint) from None
            self._write_info()
            return
        raise OutputLocked(self.target, read_lock_info(self.path))

    def _write_info(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(self.info) + "\n").encode("utf-8"), 0)

    def release(self) -> None:
        if not self.held:
            return
        fd, self._fd = self._fd, -1
        key = os.path.abspath(self.path)
        shared = _HELD.get(key)
        if shared is not None and shared[1] > 1:
            shared[1] -= 1
            return
        _HELD.pop(key, None)
        try:
            # Remove while still holding it: a run waiting on this file then sees it gone and retries.
            with contextlib.suppress(OSError):
                self.path.unlink()
        finally:
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock_info(path: Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or None if it is empty or unreadable."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextlib.contextmanager
def locked_outputs(targets: list[Path]) -> Iterator[list[OutputLock]]:
    """Hold the locks of several outputs (e.g. one per split) for the block; all or none."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(OutputLock(target)) for target in targets]
