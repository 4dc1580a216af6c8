"""The Claude Code CLI (``node_modules/.bin/claude``, pinned in package.json) through the gateway.

Each case runs ``claude -p "say hi" --output-format json`` once, in a clean HOME
and working folder, with only the environment the recipe sets (docs/clients.md), and
checks what the fake Anthropic upstream received on ``/v1/messages`` (every
credential header) and that the CLI printed the fake reply.

Claude Code retries a 401 for minutes, so every run is bounded and its whole
process group is killed when the bound is hit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness.fakeapi import REPLY_TEXT
from harness.gateway import ROOT
from harness.populations import (
    GK,
    MISTYPED_GK,
    OAUTH,
    OWN_ANTHROPIC,
    SERVER_ANTHROPIC,
    ClientsGateway,
    credentials,
    expected_credentials,
    resolve,
)

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes

CLAUDE = ROOT / "node_modules" / ".bin" / "claude"
RUN_LIMIT_S = 60.0
QUIET = {  # no traffic but the API calls, no update checks, no crash reports
    "DISABLE_TELEMETRY": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
}
_INHERITED = ("PATH", "LANG", "TMPDIR")


@dataclass(frozen=True)
class Case:
    """How a user sets Claude Code up: environment and files in their (clean) HOME."""

    prefix: str  # the route in ANTHROPIC_BASE_URL, no trailing slash (as users write it)
    env: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] | None = None  # ~/.claude/settings.json
    files: dict[str, str] = field(default_factory=dict)  # more files, by path under HOME
    login: str | None = None  # an OAuth token stored as /login stores it


CASES = [
    ("own API key in ANTHROPIC_API_KEY passes byte for byte",
     Case("/anthropic", env={"ANTHROPIC_API_KEY": OWN_ANTHROPIC}), {"x-api-key": [OWN_ANTHROPIC]}),
    ("OAuth token in ANTHROPIC_AUTH_TOKEN passes byte for byte",
     Case("/anthropic", env={"ANTHROPIC_AUTH_TOKEN": OAUTH}), {"authorization": [f"Bearer {OAUTH}"]}),
    ("OAuth login from /login passes byte for byte",
     Case("/anthropic", login=OAUTH), {"authorization": [f"Bearer {OAUTH}"]}),
    ("gateway key in ANTHROPIC_API_KEY spends the organisation's key",
     Case("/anthropic", env={"ANTHROPIC_API_KEY": GK}), {"x-api-key": [SERVER_ANTHROPIC]}),
    ("gateway key from apiKeyHelper spends the organisation's key",
     Case("/anthropic", settings={"apiKeyHelper": "cat ~/.config/gateway-key"}, files={".config/gateway-key": GK}),
     {"x-api-key": [SERVER_ANTHROPIC]}),
    ("OAuth token with the gateway key in ANTHROPIC_CUSTOM_HEADERS passes on a route that asks OAuth users for a key",
     Case("/strict/anthropic", env={"ANTHROPIC_AUTH_TOKEN": OAUTH, "ANTHROPIC_CUSTOM_HEADERS": f"x-gateway-key: {GK}"}),
     {"authorization": [f"Bearer {OAUTH}"]}),
    ("placeholder in ANTHROPIC_API_KEY spends the organisation's key on a route without gateway keys",
     Case("/open/anthropic", env={"ANTHROPIC_API_KEY": "sk-no-key-required"}), {"x-api-key": [SERVER_ANTHROPIC]}),
]  # fmt: skip


@pytest.fixture(scope="module")
def claude() -> Path:
    """The pinned CLI; missing means the test setup was skipped, which is a failure."""
    if not os.access(CLAUDE, os.X_OK):
        pytest.fail(f"{CLAUDE} is missing: run `make clients` (npm ci; `make test` does it)")
    return CLAUDE


@pytest.mark.parametrize(("case", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_claude_code(
    claude: Path,
    clients_gateway: ClientsGateway,
    tmp_path: Path,
    case: Case,
    expected: dict[str, list[str]],
) -> None:
    key = clients_gateway.gateway_key
    home = _clean_home(tmp_path, case, key)
    base = {"HOME": str(home), "ANTHROPIC_BASE_URL": clients_gateway.url(case.prefix)}
    env = _environment(QUIET | resolve(case.env, key) | base)

    code, output = _run([str(claude), "-p", "say hi", "--output-format", "json"], env, home)

    calls = [seen for seen in clients_gateway.anthropic.requests if seen.path == "/v1/messages"]
    assert calls, f"Claude Code sent no /v1/messages request; it printed:\n{output}"
    want = expected_credentials(expected, key)
    assert [credentials(seen) for seen in calls] == [want] * len(calls)
    assert clients_gateway.openai.requests == []
    assert clients_gateway.leaked() == []
    assert code == 0, f"claude exited {code}:\n{output}"
    result = json.loads(output)
    assert (result["is_error"], result["result"]) == (False, REPLY_TEXT), output


@pytest.mark.parametrize(
    "env",
    [{}, {"ANTHROPIC_API_KEY": ""}, {"ANTHROPIC_AUTH_TOKEN": ""}, {"ANTHROPIC_API_KEY": " "}],
    ids=["nothing set", "empty API key", "empty auth token", "blank API key"],
)
def test_claude_code_without_a_credential_sends_nothing(
    claude: Path, clients_gateway: ClientsGateway, tmp_path: Path, env: dict[str, str]
) -> None:
    """Why docs/clients.md has no "set neither" recipe: the CLI refuses before any request."""
    home = _clean_home(tmp_path, Case("/open/anthropic"), clients_gateway.gateway_key)
    base = {"HOME": str(home), "ANTHROPIC_BASE_URL": clients_gateway.url("/open/anthropic")}

    code, output = _run([str(claude), "-p", "say hi"], _environment(QUIET | env | base), home)

    assert (code, output.strip()) == (1, "Not logged in · Please run /login")
    assert clients_gateway.requests() == []


def test_claude_code_mistyped_gateway_key_reaches_no_upstream(
    claude: Path, clients_gateway: ClientsGateway, tmp_path: Path
) -> None:
    """The gateway answers 401 itself; the CLI retries it (for minutes), so the run is cut short."""
    home = _clean_home(tmp_path, Case("/anthropic"), clients_gateway.gateway_key)
    env = {"ANTHROPIC_API_KEY": MISTYPED_GK, "HOME": str(home)}
    env["ANTHROPIC_BASE_URL"] = clients_gateway.url("/anthropic")

    logged = len(clients_gateway.running.access_log())

    code, output = _run([str(claude), "-p", "say hi"], _environment(QUIET | env), home, 10.0)

    assert code != 0, output
    assert clients_gateway.requests() == []
    assert REPLY_TEXT not in output
    answers = [entry["status"] for entry in clients_gateway.running.access_log()[logged:]]
    assert answers, "the CLI sent nothing to the gateway"
    assert set(answers) == {401}


def _clean_home(tmp_path: Path, case: Case, gateway_key: str) -> Path:
    """A HOME with nothing in it but what ``case`` puts in ``~/.claude``."""
    home = tmp_path / "home"
    config = home / ".claude"
    config.mkdir(parents=True)
    for name, text in case.files.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(resolve(text, gateway_key))
    if case.settings is not None:
        (config / "settings.json").write_text(json.dumps(resolve(case.settings, gateway_key)))
    if case.login is not None:  # the shape /login writes (file store, used where no keychain is)
        expires_ms = int((time.time() + 86400) * 1000)
        oauth = {"accessToken": case.login, "refreshToken": "sk-ant-ort01-refresh-for-clients",
                 "expiresAt": expires_ms, "scopes": ["user:inference", "user:profile"],
                 "subscriptionType": "max"}  # fmt: skip
        (config / ".credentials.json").write_text(json.dumps({"claudeAiOauth": oauth}))
    return home


def _environment(settings: dict[str, str]) -> dict[str, str]:
    """``settings`` and enough of ours to run a program; nothing else (no key of the developer's)."""
    return {name: os.environ[name] for name in _INHERITED if name in os.environ} | settings


def _run(
    command: list[str], env: dict[str, str], cwd: Path, limit_s: float = RUN_LIMIT_S
) -> tuple[int | None, str]:
    """Run the CLI for at most ``limit_s``: its exit code (None: killed at the limit) and output."""
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own group: the CLI and anything it started
        out, err = process.communicate()
        return None, f"(killed after {limit_s:.0f}s)\n{out}\n{err}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, f"{out}\n{err}" if err else out
