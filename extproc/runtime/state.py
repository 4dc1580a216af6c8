"""Where a running gateway says what it serves: a per-user folder derived from the config.

``health`` and ``status`` are given only the YAML. ``up`` listens on a private
socket in a random folder, so it records that socket here, and the processor
records what it serves (version, counts, store, watcher) after each load. The
folder is ``$XDG_RUNTIME_DIR`` (or the temp folder) ``/credential-gateway-<uid>/<digest
of the config's absolute path>``, mode 0700. Nothing secret is written: paths,
versions and counts only. The temp folder is shared by every user: a per-user folder
found there owned by someone else, or writable by group or others, could hand ``health``
another socket, so it is refused (one warning line) and status is not recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from extproc.config.files import write_atomic

UP_FILE = "up.json"  # written by ``up``: its pid and where its processor listens
PROCESSOR_FILE = "processor.json"  # written by the processor: what it serves
log = logging.getLogger("extproc.runtime")


class UnsafeStateFolder(OSError):
    """The per-user folder exists but another user could write into it."""


def state_dir(config_path: Path) -> Path:
    """The folder for ``config_path``'s gateway (not created)."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    digest = hashlib.sha256(str(config_path.resolve()).encode()).hexdigest()[:16]
    return base / f"credential-gateway-{os.getuid()}" / digest


def write_state(config_path: Path, name: str, data: dict[str, Any]) -> None:
    """Replace one state file (atomically); an unwritable folder is not an error."""
    folder = state_dir(config_path)
    try:
        _private(folder.parent)
        folder.mkdir(mode=0o700, exist_ok=True)
        write_atomic(folder / name, json.dumps(data, sort_keys=True) + "\n", 0o644)
    except UnsafeStateFolder as exc:
        log.warning("%s", exc)
    except OSError:
        pass  # status is a convenience: serving never depends on it


def read_state(config_path: Path, name: str) -> dict[str, Any] | None:
    """One state file, if it exists and the process that wrote it still runs."""
    folder = state_dir(config_path)
    try:
        _private(folder.parent, create=False)
        data = json.loads((folder / name).read_text())
    except UnsafeStateFolder as exc:
        log.warning("%s", exc)
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not _alive(data.get("pid")):
        return None
    return data


def remove_state(config_path: Path, name: str) -> None:
    (state_dir(config_path) / name).unlink(missing_ok=True)


def _private(folder: Path, create: bool = True) -> None:
    """Make sure ``folder`` is this user's alone (created 0700 when ``create``).

    Raises UnsafeStateFolder when it is a link, not a folder, someone else's, or
    writable by group or others; FileNotFoundError when absent and not ``create``.
    """
    if create:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)  # the mode only if made now: checked below
    found = folder.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
        raise UnsafeStateFolder(
            f"state folder {folder} is not a folder of uid {os.getuid()}: not used (remove it)"
        )
    if found.st_mode & 0o022:
        raise UnsafeStateFolder(
            f"state folder {folder} is writable by group or others: not used (remove it)"
        )
    if found.st_mode & 0o077:
        folder.chmod(0o700)  # one an older gateway made 0755: ours, so tightened


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
