"""Read a file the config names, with bounds, and say in one line why it cannot be used.

Every file the gateway reads at load (the YAML, secrets, keys, TLS files) goes
through here, so a directory, a FIFO, /dev/zero, a file of gigabytes or one
that is not readable gives a clear error instead of a hang, a traceback or
all of memory. Messages name the path, never the content. Every file the gateway
writes (xDS files, keys files, state, the token cache) is replaced by ``write_atomic``.
"""

from __future__ import annotations

import os
import stat
import tempfile
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


def write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one rename: readers see old or new, never part.

    The temp file is in ``path``'s folder (a rename never crosses file systems) and synced
    before the rename. ``mode``: the new file's; None keeps the old file's (a new file gets
    0666 minus the umask, read by setting it: for one-shot commands, not threaded servers).
    """
    if mode is None:
        mode = path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode()
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    umask = os.umask(0)  # reading it means setting it
    os.umask(umask)
    return 0o666 & ~umask


def _reason(exc: OSError) -> str:
    return exc.strerror or os.strerror(exc.errno or 0) or type(exc).__name__


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit // 2**10} KiB"
