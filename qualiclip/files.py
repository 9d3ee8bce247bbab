"""Opening files that users name: regular files only, with a reason when one cannot be read.

A FIFO named ``photo.jpg`` or ``config.json`` would block `open` until a writer appears, and a
device may act on being opened, so the type is checked with `os.stat` before the open; the
open itself is non-blocking and checked again with `os.fstat` (a file swapped in between is
refused too). Callers turn `FileReadError` into their own error (`ImageReadError`,
`ModelLoadError`, ...): its ``reason`` is machine-readable, its ``detail`` names the fix.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class FileReadError(OSError):
    """A file that cannot be read; ``reason`` is ``not_a_file``, ``symlink_loop``, ``too_large`` or ``unreadable``."""

    def __init__(self, reason: str, detail: str, path: str | Path):
        self.reason, self.detail, self.path = reason, detail, path
        super().__init__(f"{path}: {detail}")


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (symlinks followed), else `FileReadError`."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _not_a_file(mode, path)
        fd = os.open(path, READ_FLAGS)
    except FileReadError:
        raise
    except OSError as exc:
        raise os_error(exc, path) from None
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise _not_a_file(mode, path)
    return f


def read_regular(path: str | Path, *, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path``; `FileReadError` (``too_large``) above ``max_bytes``."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise FileReadError("too_large", f"{size} bytes, more than the {max_bytes} such a file can need", path)
        try:
            return f.read()
        except OSError as exc:
            raise os_error(exc, path) from None


def os_error(exc: OSError, path: str | Path) -> FileReadError:
    """An `OSError` of stat/open/read as a `FileReadError`: a symlink loop, a broken link, or unreadable."""
    if exc.errno == errno.ELOOP:
        return symlink_loop(path)
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return FileReadError("unreadable", f"broken symlink to {os.readlink(path)}", path)
    return FileReadError("unreadable", f"cannot read the file: {exc.strerror or exc}", path)


def symlink_loop(path: str | Path) -> FileReadError:
    return FileReadError("symlink_loop", "symlink loop (the link leads back to itself) — fix or remove the link", path)


def _not_a_file(mode: int, path: str | Path) -> FileReadError:
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return FileReadError("not_a_file", f"{kind}, not a regular file — only regular files are read", path)
