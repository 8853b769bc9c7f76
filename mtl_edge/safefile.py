"""Opening files whose names come from users, manifests and galleries: regular files only.

A FIFO blocks the reader forever, a device can be endless or act on open (a watchdog, a tape), a
directory or a symlink loop ends in an OSError that names neither the file nor the fix. So the
type is checked with stat() before the file is opened, the open itself uses O_NONBLOCK (a FIFO
swapped in after the check cannot block it) and fstat() checks the open descriptor again. Reads
are bounded. Every refusal is the caller's `MtlEdgeError` subclass with one line naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from mtl_edge.errors import MtlEdgeError

#: Pseudo file systems whose "regular" files are kernel state, never user data.
PSEUDO_ROOTS = ("/proc", "/sys")


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words (for messages)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "no such file"
    if e.errno == errno.ELOOP:
        return "is a symlink loop"
    if e.errno == errno.ENOTDIR:
        return "a folder on its path is a file"
    if e.errno == errno.EISDIR:
        return "is a directory"
    return f"cannot open ({e.strerror or e})"


def open_regular(
    path: str | Path,
    error: type[MtlEdgeError],
    fix: str,
    missing: str | None = None,
) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (symlinks to one are followed).

    Args:
        error: the exception class to raise.
        fix: what the user should do, appended to every message.
        missing: the whole message after "<path>: " when the file does not exist.

    Raises:
        MtlEdgeError: an `error` naming the file: missing, a directory, a FIFO, a device, a
            socket, a symlink loop, or unreadable.
    """
    name = str(path)
    if "\0" in name:
        raise error(f"{name!r}: a file name cannot contain a NUL byte; {fix}")
    try:
        before = os.stat(name)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(name):
            raise error(f"{name}: is a symlink to a missing file; {fix}") from None
        if e.errno == errno.ENOENT and missing is not None:
            raise error(f"{name}: {missing}") from None
        raise error(f"{name}: {_os_reason(e)}; {fix}") from None
    if not stat.S_ISREG(before.st_mode):
        raise error(f"{name}: is {kind_of(before.st_mode)}, not a regular file; {fix}")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"{name}: {_os_reason(e)}; {fix}") from None
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (
            before.st_dev,
            before.st_ino,
        ):
            raise error(f"{name}: was replaced while being opened; {fix}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | Path,
    max_bytes: int,
    error: type[MtlEdgeError],
    fix: str,
    missing: str | None = None,
) -> bytes:
    """The bytes of the regular file `path`, refused when larger than `max_bytes`.

    The limit is checked on the size the file reports and again while reading (files under
    /proc report 0 bytes and can be longer).
    """
    with open_regular(path, error, fix, missing) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is over the limit of {max_bytes}; {fix}")
        # read(n) allocates n bytes up front: ask for the reported size, then for the rest in
        # chunks (a file that grows or reports 0), never for the whole limit at once
        chunks, total, want = [], 0, size + 1
        try:
            while total <= max_bytes and (block := f.read(min(want, max_bytes + 1 - total))):
                chunks.append(block)
                total += len(block)
                want = 1 << 20
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror or e}); {fix}") from None
    if total > max_bytes:
        raise error(f"{path}: more than the limit of {max_bytes} bytes; {fix}")
    return b"".join(chunks)


def in_pseudo_fs(path: str | Path) -> bool:
    """True when `path` (symlinks resolved) lies under /proc or /sys."""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + "/") for root in PSEUDO_ROOTS)
