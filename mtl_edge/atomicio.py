"""Crash-safe writes and an inter-process lock.

Every file the project saves for a user (bundles, galleries, run checkpoints) goes through
here: write to a temporary sibling, fsync, then rename over the final name. A crash at any point
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from mtl_edge.errors import MtlEdgeError
from mtl_edge.safefile import kind_of


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give the final file the usual umask mode so a
    bundle or gallery copied to another user or device stays readable."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file atomically: `write(f)` fills a temp file that then replaces `path`.

    Args:
        path: the final file name.
        write: called with a binary file object opened for writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _publishable(Path(tmp), directory=False)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically replace `path` with `obj` as indented, key-sorted JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def staged_dir(final: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to `final` only on success.

    Yields the staging directory to fill. If `final` exists, refuses unless `force`; with
    `force` the old directory is swapped out and deleted only after the new one is in place.
    """
    final = Path(final)
    if final.exists() and not force:
        raise MtlEdgeError(f"{final}: already exists; choose another --out or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield stage
        for child in stage.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        _publishable(stage, directory=True)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(final, old)
        os.replace(stage, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _open_lock_file(path: Path) -> IO[bytes]:
    """Open (or create) a lock file, refusing a symlink, directory, FIFO, device or socket in its
    place before opening it (a FIFO would block, a device could act on open, a symlink could
    point at any file)."""
    fix = "remove it; mtl-edge recreates the lock file"
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise MtlEdgeError(f"{path}: is a symlink, not a lock file; {fix}")
        if not stat.S_ISREG(mode):
            raise MtlEdgeError(f"{path}: is {kind_of(mode)}, not a lock file; {fix}")
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        raise MtlEdgeError(f"{path}: cannot open the lock file ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MtlEdgeError(f"{path}: is not a regular file, not a lock file; {fix}")
    return os.fdopen(fd, "r+b")


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float = 30.0) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the block.

    Two processes that enroll into the same gallery serialise their read-modify-write through
    this lock, so neither loses the other's classes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_lock_file(path) as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MtlEdgeError(
                        f"{path}: still locked by another process after {timeout_s:.0f} s; "
                        "wait for it to finish or remove a stale lock file"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
