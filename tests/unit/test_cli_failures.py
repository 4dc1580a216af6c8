"""Expected failures of the command line end in one line and a non-zero code, never a traceback;
and ``up`` (which forks Envoy) never loads gRPC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extproc.cli import main

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - {name: plain, prefix: /p, upstream: 'http://127.0.0.1:1'}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "{missing}/gateway.yaml"],
        ["render", "{config}", "-o", "{missing}/envoy.yaml"],
        ["render", "{config}", "--xds-dir", "{config}/xds"],  # a file where a folder must be
        ["health", "{missing}/gateway.yaml"],
        ["status", "{missing}/gateway.yaml"],
    ],
    ids=["validate_missing", "render_output", "render_xds_dir", "health", "status"],
)
def test_a_missing_folder_or_unwritable_file_is_one_line_and_code_2(
    argv: list[str], config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = {"config": str(config), "missing": str(tmp_path / "no" / "such")}
    assert main([arg.format(**names) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_up_and_its_runtime_never_import_grpc() -> None:
    """Envoy is forked from ``up``: no gRPC thread or descriptor may exist there to inherit."""
    probe = (
        "import sys, extproc.cli, extproc.runtime.supervisor as s, extproc.runtime.status; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'grpc_health')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stdout
