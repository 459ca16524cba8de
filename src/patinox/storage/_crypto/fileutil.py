"""Small helpers for private key files: write-then-publish, directory fsync."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "write_private_temp"]


def write_private_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new mode-0600 temporary file beside ``path``, synced; return its path.

    The temporary name starts with ``.`` and ends with ``.tmp``; the caller publishes it
    (``os.link`` for create-only, ``os.replace`` to overwrite) and unlinks it.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a link, unlink or rename in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
