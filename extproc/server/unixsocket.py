"""The processor's Unix socket: who may connect is decided by file permissions.

Its answers carry the server's key, so on a shared host a TCP port on loopback
is not private enough: any local process could ask for the key. A socket file
with mode 0660 admits only its owner and group (Envoy runs as one of them).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

MODE = 0o660


class SocketInUse(OSError):
    """Another live process is serving on the socket path."""


def prepare(path: Path) -> None:
    """Remove a stale socket file left by a crash; refuse if someone still serves on it."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketInUse(f"{path} exists and is not a socket")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    finally:
        probe.close()
    raise SocketInUse(f"{path} is in use by another process")


def restrict(path: Path) -> None:
    """Owner and group only (and the folder must let them reach it)."""
    os.chmod(path, MODE)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
