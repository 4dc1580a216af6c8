"""docs/team.md, run as written: its YAML and every shell block, in order, with the real
``gateway`` command, real Envoy under ``gateway up``, the pinned Claude Code CLI and curl.

Only what a reader would change is changed: the fake Anthropic API (harness.fakeapi) in place
of https://api.anthropic.com, free ports in place of 4000/9901/9464, and the three secrets the
page expects in the shell. Variables a block sets (``ALICE_KEY=$(…)``, ``export …``) are kept
for the blocks after it, as in one terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.fakeapi import REPLY_TEXT, anthropic_api
from harness.gateway import ROOT
from harness.liveops import accepts_connections
from harness.populations import OAUTH, OWN_ANTHROPIC, SERVER_ANTHROPIC, credentials
from harness.ports import free_port
from harness.upstream import RecordingUpstream

from extproc.config.model import Endpoint
from extproc.runtime import processes

pytestmark = pytest.mark.slow  # starts real Envoy, the processor and Claude Code

PAGE = ROOT / "docs" / "team.md"
MARKER = "<!-- run by tests/clients/test_clients_team.py"
BLOCK = re.compile(r"^(<!--[^\n]*-->)\n```(\w+)\n(.*?)^```", re.M | re.S)
YAML = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)
# A variable a block leaves set (``X=$(…)``, ``export X=…``), not one a command is run with.
ASSIGNED = re.compile(r"^(?:export )?([A-Z_][A-Z0-9_]*)=(?:\$\(|\S*$)", re.M)
RUN_LIMIT_S = 90.0
BASH = shutil.which("bash") or "/bin/bash"
QUIET = {  # as tests/clients/test_clients_claude_code.py: no traffic but the API calls
    "DISABLE_TELEMETRY": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
}


def blocks() -> list[tuple[bool, str]]:
    """The page's shell blocks this test runs: (in the background?, text)."""
    found = [
        ("in the background" in marker, text)
        for marker, lang, text in BLOCK.findall(PAGE.read_text())
        if marker.startswith(MARKER) and lang == "sh"
    ]
    assert len(found) == 5, f"docs/team.md: {len(found)} blocks marked for this test, not 5"
    return found


class Terminal:
    """One reader's shell: a folder, an environment, the variables blocks have set."""

    def __init__(self, folder: Path, env: dict[str, str], ports: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.ports = ports
        self.state = folder / ".terminal-state.sh"
        self.state.write_text("")

    def text(self, block: str) -> str:
        for written, used in self.ports.items():
            block = block.replace(written, used)
        return block

    def script(self, block: str) -> str:
        names = sorted(set(ASSIGNED.findall(block)))
        keep = f"declare -p {' '.join(names)} >> {self.state}\n" if names else ""
        return f"set -euo pipefail\nsource {self.state}\n{self.text(block)}\n{keep}"

    def run(self, block: str) -> str:
        done = subprocess.run(
            [BASH, "-c", self.script(block)], cwd=self.folder, env=self.env,
            capture_output=True, text=True, timeout=RUN_LIMIT_S, check=False,
            start_new_session=True,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"block failed ({done.returncode}):\n{block}\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    def start(self, block: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                [BASH, "-c", self.script(block)], cwd=self.folder, env=self.env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip


@pytest.fixture
def anthropic() -> Iterator[RecordingUpstream]:
    with RecordingUpstream("anthropic-upstream", responder=anthropic_api) as upstream:
        yield upstream


def _tools() -> str:
    claude = ROOT / "node_modules" / ".bin" / "claude"
    if not os.access(claude, os.X_OK):
        pytest.fail(f"{claude} is missing: run `make clients` (npm ci; `make test` does it)")
    curl = shutil.which("curl")
    assert curl, "curl is needed (Debian: apt-get install curl)"
    venv = Path(sys.executable).parent  # the virtualenv's bin: gateway, envoy
    return os.pathsep.join([str(venv), str(claude.parent), str(Path(curl).parent), "/usr/bin:/bin"])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(admin: int, listener: int, up: subprocess.Popen[bytes], log: Path) -> None:
    try:
        processes.wait_envoy_ready(Endpoint("127.0.0.1", admin), 60.0, up)
        end = time.monotonic() + 30.0
        while not accepts_connections(listener):
            assert up.poll() is None, "gateway up exited"
            assert time.monotonic() < end, f"nothing listening on {listener}"
            time.sleep(0.05)
    except (processes.NotReady, AssertionError) as exc:
        raise AssertionError(f"{exc}\n{log.read_text()}") from exc


def test_the_team_walkthrough_runs_as_written(tmp_path: Path, anthropic: RecordingUpstream) -> None:
    page = PAGE.read_text()
    listener, admin, metrics = free_port(), free_port(), free_port()
    ports = {":4000": f":{listener}", "port: 4000": f"port: {listener}",
             "port: 9901": f"port: {admin}", ":9464": f":{metrics}", "port: 9464": f"port: {metrics}",
             "https://api.anthropic.com": anthropic.url()}  # fmt: skip
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    env = {"PATH": _tools(), "HOME": str(home), "LANG": "C.UTF-8", **QUIET,
           "ANTHROPIC_API_KEY_ORG": SERVER_ANTHROPIC, "BOB_API_KEY": OWN_ANTHROPIC,
           "CAROL_OAUTH_TOKEN": OAUTH}  # fmt: skip
    folder = tmp_path / "team"
    folder.mkdir()
    terminal = Terminal(folder, env, ports)
    (folder / "team.yaml").write_text(terminal.text(YAML.findall(page)[0]))
    found = blocks()
    assert [background for background, _ in found] == [False, True, False, False, False]
    keys, up_block, claude, limits, spend = [text for _, text in found]

    listed = terminal.run(keys)
    for name in ("alice", "bob", "carol", "ci-bot"):
        assert re.search(rf"^{name}\b", listed, re.M), listed
    assert "team.yaml: OK (1 route(s)" in listed
    assert "gk-" not in listed  # list never shows a key; the key variables stay in the shell

    log = tmp_path / "up.log"
    up = terminal.start(up_block, log)
    try:
        _wait_ready(admin, listener, up, log)
        said = terminal.run(claude)
        assert said.count(REPLY_TEXT) == 3, said
        calls = [credentials(r) for r in anthropic.requests if r.path == "/v1/messages"]
        assert {"x-api-key": [SERVER_ANTHROPIC.encode()]} in calls, calls  # alice
        assert {"x-api-key": [OWN_ANTHROPIC.encode()]} in calls, calls  # bob, byte for byte
        assert {"authorization": [f"Bearer {OAUTH}".encode()]} in calls, calls  # carol

        assert terminal.run(limits) == "200\n429\n"

        end = time.monotonic() + 30.0
        while True:  # the ledger is written every second: the reader may look twice
            shown = terminal.run(spend)
            if (
                all(n in shown for n in ("alice", "bob", "carol", "ci-bot"))
                and 'client="ci-bot"' in shown
            ):
                break
            assert time.monotonic() < end, shown
            time.sleep(0.5)
        assert "gateway_usage_requests_total" in shown
    finally:
        _stop(up)
    leaked = [r.path for r in anthropic.requests if any(b"gk-" in v for _, v in r.headers)]
    assert leaked == [], "a gateway key reached the provider"
