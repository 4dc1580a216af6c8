"""``write_atomic``: the one way the gateway replaces a file (xDS, keys, state, token cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from extproc import token_cli
from extproc.config import files
from extproc.config.files import write_atomic
from extproc.policy import keysfile
from extproc.runtime import state, workers, xds


def test_a_mode_given_is_the_files_and_none_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("old\n")
    path.chmod(0o640)
    write_atomic(path, "new\n")
    assert (path.read_text(), path.stat().st_mode & 0o777) == ("new\n", 0o640)
    write_atomic(path, "xds\n", 0o644)
    assert path.stat().st_mode & 0o777 == 0o644
    umask = os.umask(0o027)
    try:
        write_atomic(tmp_path / "fresh", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o640


def test_the_temp_file_is_in_the_same_folder_synced_and_gone_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cds.json"
    path.write_text("old")
    synced: list[int] = []
    renamed: list[Path] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])

    def fail(src: str, dst: Path) -> None:
        renamed.append(Path(src))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic(path, "new", 0o644)
    assert synced and [p.parent for p in renamed] == [tmp_path]
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]  # no temp left


def test_every_writer_uses_it(tmp_path: Path) -> None:
    for module in (xds, keysfile, state, workers, token_cli):
        assert module.write_atomic is files.write_atomic, module.__name__
        assert not hasattr(module, "atomic_write"), module.__name__
    cache = tmp_path / "cache" / "token.json"
    token_cli.store(cache, "tok", 123.0)
    assert cache.stat().st_mode & 0o777 == 0o600
    assert json.loads(cache.read_text())["access_token"] == "tok"
