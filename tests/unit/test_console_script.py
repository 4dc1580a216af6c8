"""The ``gateway`` command the package installs (``[project.scripts]``) works from the
virtualenv's bin folder alone: no ``python -m``, no activated environment, no source tree
on the path."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "gateway"
CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - {name: plain, prefix: /p, upstream: 'http://127.0.0.1:1'}
"""


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Only PATH: the script must find its package through the virtualenv, not PYTHONPATH.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [str(SCRIPT), *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pyproject_installs_the_gateway_script() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"gateway": "extproc.cli:main"}


def test_the_installed_script_prints_its_help_under_its_own_name(tmp_path: Path) -> None:
    done = _run("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: gateway ")
    for command in ("validate", "render", "up", "keys", "spend", "token"):
        assert command in done.stdout


def test_the_installed_script_validates_a_config_outside_the_source_tree(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(CONFIG)
    done = _run("validate", "gateway.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gateway.yaml: OK (1 route(s)")


def test_a_bad_config_is_one_line_and_code_2(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(CONFIG.replace("4000", "0"))
    done = _run("validate", "gateway.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "gateway.yaml:1 listener.port: must be between 1 and 65535, got 0"
