"""The Claude Code CLI with a person's SSO token: ``apiKeyHelper`` runs ``extproc token``.

A real OpenID provider (oidc-provider) issues the tokens; real Envoy checks them.
The CLI's usage lands on the person's name, the upstream sees the organisation's
key and never the token; an expired token gets a 401 and Claude Code calls its
helper again, then succeeds; a subscription user's OAuth token beside a token in
``ANTHROPIC_CUSTOM_HEADERS`` passes byte for byte.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Gateway, RecordingUpstream, credential_route
from harness.adversary import leaks, poll
from harness.fakeapi import REPLY_TEXT, anthropic_api
from harness.gateway import ROOT
from harness.oidc import OpenIdProvider, Person
from harness.populations import OAUTH
from test_clients_claude_code import CLAUDE, QUIET, _environment, _run

pytestmark = pytest.mark.slow  # real Envoy, processor, OpenID provider and the CLI

SERVER_KEY = "sk-ant-api03-organisation-key-for-sso"
AUDIENCE = "https://gateway.test"
PEOPLE = [Person("alice-cli", "alice@example.com", ("ml",)), Person("bob-cli", "bob@x.org", ttl=1)]


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[OpenIdProvider]:
    oidc = OpenIdProvider(tmp_path, PEOPLE).start()
    try:
        yield oidc
    finally:
        oidc.stop()


@pytest.fixture
def anthropic(start_upstream: Callable[..., RecordingUpstream]) -> RecordingUpstream:
    return start_upstream("anthropic", responder=anthropic_api)


@pytest.fixture
def gateway(
    start_gateway: Callable[..., Gateway],
    anthropic: RecordingUpstream,
    provider: OpenIdProvider,
    tmp_path: Path,
) -> Gateway:
    route = credential_route(
        "anthropic", anthropic.url(), client_credentials=["authorization", "x-api-key"]
    )
    keys_file = tmp_path / "keys.txt"  # machines' keys; x-gateway-key is the access header
    keys_file.write_text(f"ci-bot sha256:{'0' * 64}\n")
    sso = {"issuer": provider.issuer, "audiences": [AUDIENCE], "clock_skew_s": 1}
    top = {"sso": sso, "access": {"keys_file": str(keys_file), "header": "x-gateway-key"}}
    return start_gateway([route], env={"ANTHROPIC_KEY": SERVER_KEY}, top=top)


def _helper(provider: OpenIdProvider, home: Path, client_id: str) -> str:
    """The apiKeyHelper line a person puts in ~/.claude/settings.json (secret in a file)."""
    secret = home / ".config" / "gateway" / "secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(provider.secret_of(client_id))
    command = [sys.executable, "-m", "extproc", "token", "--issuer", provider.issuer,
               "--client-id", client_id, "--secret-file", str(secret), "--audience", AUDIENCE,
               "--scope", "api", "--cache", str(home / ".cache" / "token.json")]  # fmt: skip
    return f"cd {shlex.quote(str(ROOT))} && " + shlex.join(command)


def _home(tmp_path: Path, settings: dict[str, object]) -> Path:
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "settings.json").write_text(json.dumps(settings))
    return home


def _claude(
    gateway: Gateway, home: Path, env: dict[str, str] | None = None
) -> tuple[int | None, str]:
    base = {"HOME": str(home), "ANTHROPIC_BASE_URL": gateway.url("/anthropic")}
    command = [str(CLAUDE), "-p", "say hi", "--output-format", "json"]
    return _run(command, _environment(QUIET | base | (env or {})), home)


def _statuses(gateway: Gateway) -> list[int]:
    """The access log's statuses of /v1/messages (Envoy flushes its log on a timer)."""
    return [e["status"] for e in gateway.access_log() if e["path"] == "/anthropic/v1/messages"]


def _clients(gateway: Gateway, count: int) -> set[object]:
    """Who the logged /v1/messages requests were (once ``count`` are logged)."""
    path = "/anthropic/v1/messages"
    entries = poll(
        lambda: (
            (e := [x for x in gateway.access_log() if x["path"] == path]) and len(e) >= count and e
        ),
        "logged",
    )
    return {entry["client"] for entry in entries}


def _calls(upstream: RecordingUpstream) -> list[dict[str, list[bytes]]]:
    seen = [r for r in upstream.requests if r.path == "/v1/messages"]
    return [{h: r.values(h) for h in ("x-api-key", "authorization")} for r in seen]


def test_api_key_helper_token_names_the_person(
    gateway: Gateway, anthropic: RecordingUpstream, provider: OpenIdProvider, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home = _home(tmp_path, {"apiKeyHelper": _helper(provider, home, "alice-cli")})
    code, output = _claude(gateway, home)
    assert code == 0, output
    assert json.loads(output)["result"] == REPLY_TEXT
    calls = _calls(anthropic)
    assert calls and all(
        c == {"x-api-key": [SERVER_KEY.encode()], "authorization": []} for c in calls
    )
    assert _clients(gateway, len(calls)) == {"alice@example.com"}
    token = json.loads((home / ".cache" / "token.json").read_text())["access_token"]
    blobs = [repr(r.headers).encode() + r.body for r in anthropic.requests]
    assert not leaks([token], *blobs, gateway.logs())


def test_an_expired_token_makes_claude_code_call_its_helper_again(
    gateway: Gateway, anthropic: RecordingUpstream, provider: OpenIdProvider, tmp_path: Path
) -> None:
    expired = provider.token("bob-cli", AUDIENCE)  # lives 1 s (+1 s skew)
    home = tmp_path / "home"
    home.mkdir()
    calls = home / "helper-calls"
    fresh = _helper(provider, home, "alice-cli")
    # The first call hands out the expired token, every later one a fresh token.
    script = home / "helper.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"echo x >> {shlex.quote(str(calls))}\n"
        f"if [ $(wc -l < {shlex.quote(str(calls))}) -eq 1 ]; then echo {expired}; exit 0; fi\n"
        f"{fresh}\n"
    )
    script.chmod(0o755)
    home = _home(tmp_path, {"apiKeyHelper": str(script)})
    end = time.time() + 3
    poll(lambda: time.time() > end, "past the short token's expiry and skew")
    code, output = _claude(gateway, home)
    assert code == 0, output
    assert json.loads(output)["result"] == REPLY_TEXT
    assert len(calls.read_text().split()) >= 2  # called again after the 401
    statuses = poll(lambda: (s := _statuses(gateway)) and s[-1] == 200 and s, "logged")
    assert 401 in statuses  # the expired token, refused by Envoy
    assert not leaks([expired], *(repr(r.headers) for r in anthropic.requests), gateway.logs())


def test_a_subscription_users_oauth_token_passes_beside_their_sso_token(
    gateway: Gateway, anthropic: RecordingUpstream, provider: OpenIdProvider, tmp_path: Path
) -> None:
    token = provider.token("alice-cli", AUDIENCE)
    home = _home(tmp_path, {})
    env = {"ANTHROPIC_AUTH_TOKEN": OAUTH, "ANTHROPIC_CUSTOM_HEADERS": f"x-gateway-key: {token}"}
    code, output = _claude(gateway, home, env)
    assert code == 0, output
    calls = _calls(anthropic)
    assert calls and all(
        c == {"x-api-key": [], "authorization": [f"Bearer {OAUTH}".encode()]} for c in calls
    )
    assert _clients(gateway, len(calls)) == {"alice@example.com"}
    assert not leaks([token], *(repr(r.headers) for r in anthropic.requests), gateway.logs())
