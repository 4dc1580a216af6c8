"""Read a file the config names, with bounds, and say in one line why it cannot be used.

Every file the gateway reads at load (the YAML, secrets, keys, TLS files) goes
through here, so a directory, a FIFO, /dev/zero, a file of gigabytes or one
that is not readable gives a clear error instead of a hang, a traceback or
all of memory. Messages name the path, never the content.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class FileProblem(Exception):
    """The file cannot be used: ``str()`` names the path; ``reason`` alone, for other wordings."""

    def __init__(self, message: str, reason: str, missing: bool = False) -> None:
        super().__init__(message)
        self.reason = reason  # "is not a regular file", "cannot be read: Permission denied"
        self.missing = missing  # it does not exist (for callers where that is allowed)


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes (``what`` names it)."""
    too_large = f"is larger than {_size(limit)}"
    try:
        info = path.stat()  # follows symlinks (Kubernetes' ..data): the target must be a file
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{path}: {what} is not a regular file", "is not a regular file")
        if info.st_size > limit:
            raise FileProblem(f"{path}: {what} {too_large}", too_large)
        with path.open("rb") as handle:
            data = handle.read(limit + 1)  # the file may have grown since stat
    except OSError as exc:
        reason = _reason(exc)
        missing = isinstance(exc, FileNotFoundError)
        raise FileProblem(
            f"{path}: cannot read {what}: {reason}", f"cannot be read: {reason}", missing
        ) from None
    except ValueError:  # a NUL byte in the path
        raise FileProblem(
            f"{path!r}: cannot read {what}: not a usable path", "is not a usable path"
        ) from None
    if len(data) > limit:
        raise FileProblem(f"{path}: {what} {too_large}", too_large)
    return data


def _reason(exc: OSError) -> str:
    return exc.strerror or os.strerror(exc.errno or 0) or type(exc).__name__


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit // 2**10} KiB"
