"""The state folder in a shared temp folder: made 0700, and refused when another user could
write into it (it could point ``health`` at a socket of theirs)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from extproc.runtime import state


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o1777)
    (tmp_path / "run").chmod(0o1777)  # like /tmp
    path = tmp_path / "gateway.yaml"
    path.write_text("")
    return path


def plant(config: Path) -> Path:
    """Someone else's up.json naming their socket, in the folder this gateway would use."""
    folder = state.state_dir(config)
    folder.mkdir(parents=True)
    (folder / state.UP_FILE).write_text(json.dumps({"pid": os.getpid(), "target": "unix:/x"}))
    return folder.parent


def test_the_per_user_folder_is_created_0700(config: Path) -> None:
    state.write_state(config, state.UP_FILE, {"pid": os.getpid()})
    base = state.state_dir(config).parent
    assert base.stat().st_mode & 0o777 == 0o700
    assert state.read_state(config, state.UP_FILE) == {"pid": os.getpid()}


def test_a_world_writable_folder_is_refused_in_one_line(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = plant(config)
    base.chmod(0o777)
    with caplog.at_level(logging.WARNING, "extproc.runtime"):
        assert state.read_state(config, state.UP_FILE) is None
        state.write_state(config, state.PROCESSOR_FILE, {"pid": os.getpid()})
    assert not (state.state_dir(config) / state.PROCESSOR_FILE).exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"state folder {base} is writable by group or others: not used (remove it)"
    ] * 2


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_is_refused(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = plant(config)
    base.chmod(0o700)
    os.chown(base, 65534, 65534)
    with caplog.at_level(logging.WARNING, "extproc.runtime"):
        assert state.read_state(config, state.UP_FILE) is None
    assert caplog.records[0].getMessage() == (
        f"state folder {base} is not a folder of uid {os.getuid()}: not used (remove it)"
    )


def test_a_folder_an_older_gateway_made_0755_is_tightened(config: Path) -> None:
    base = plant(config)
    base.chmod(0o755)
    assert state.read_state(config, state.UP_FILE) == {"pid": os.getpid(), "target": "unix:/x"}
    assert base.stat().st_mode & 0o777 == 0o700
