"""People from the organisation's SSO through real Envoy and a real OpenID provider.

``oidc-provider`` (npm, pinned) issues real RS256 access tokens by the
client-credentials grant; Envoy's ``jwt_authn`` checks them against the keys it
found through the provider's discovery document. A person's email names the
client in the access log; wrong-audience, wrong-issuer, expired, not-yet-valid and
tampered tokens get 401 in the provider's shape; gateway keys and own credentials
keep working beside tokens; no token reaches the upstream or a log.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Gateway,
    RecordedRequest,
    RecordingUpstream,
    base_env,
    credential_route,
    raw_request,
)
from harness.adversary import leaks, poll
from harness.gateway import ROOT
from harness.oidc import OpenIdProvider, Person

from extproc.policy.access import key_digest

pytestmark = pytest.mark.slow  # starts real Envoy, processor and OpenID provider processes

SERVER_KEY = "sk-ant-api03-server-key-sso"
AUDIENCE = "https://gateway.test"
GATEWAY_KEY = "gk-ci-bot-0123456789abcdef0123456789abcdef"
INTERN_KEY = "gk-intern-bot-0123456789abcdef0123456789abcd"
OAUTH = "sk-ant-oat01-subscription-token-of-carol"
PEOPLE = [
    Person("alice-cli", "alice@example.com", ("ml", "platform")),
    Person("bob-cli", "bob@example.com", ("sales",), ttl=2),
    Person("ivy-cli", "ivy@example.com", ("interns",)),
]
HAIKU = "claude-haiku-4-5"


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[OpenIdProvider]:
    oidc = OpenIdProvider(tmp_path, PEOPLE).start()
    try:
        yield oidc
    finally:
        oidc.stop()


@pytest.fixture
def gateway(
    start_gateway: Callable[..., Gateway],
    upstream: RecordingUpstream,
    provider: OpenIdProvider,
    tmp_path: Path,
) -> Gateway:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(
        f"ci-bot sha256:{key_digest(GATEWAY_KEY)} teams=ci\n"
        f"intern-bot sha256:{key_digest(INTERN_KEY)} teams=interns\n"
    )
    sso = {
        "issuer": provider.issuer,
        "audiences": [AUDIENCE],
        "clock_skew_s": 1,
        "models": {"interns": [HAIKU]},
    }
    return start_gateway(
        [credential_route("sso", upstream.url())],
        env={"SSO_KEY": SERVER_KEY},
        top={"access": {"keys_file": str(keys_file)}, "sso": sso},
    )


def _send(
    gateway: Gateway, headers: list[tuple[str, str]], body: dict[str, Any] | bytes | None = None
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body else b""
    kind = [("content-type", "application/json")] if isinstance(body, dict) else []
    method = "POST" if body is not None else "GET"
    reply = raw_request(
        gateway.listener_port, "/sso/v1/messages", kind + headers, method=method, body=data
    )
    body = json.loads(reply.body) if reply.body.startswith(b"{") else {}
    return reply.status, body


def _clients(gateway: Gateway, count: int) -> list[object]:
    """The access log's client field of the first ``count`` requests (Envoy flushes on a timer)."""
    lines = poll(lambda: (log := gateway.access_log()) and len(log) >= count and log, "logged")
    return [line.get("client") for line in lines]


def _blob(request: RecordedRequest) -> bytes:
    return repr(request.headers).encode() + request.body


def test_a_persons_token_names_them_and_never_goes_upstream(
    gateway: Gateway, upstream: RecordingUpstream, provider: OpenIdProvider
) -> None:
    token = provider.token("alice-cli", AUDIENCE)
    # Claude Code's apiKeyHelper: the same token as x-api-key and Authorization: Bearer.
    status, _ = _send(gateway, [("x-api-key", token), ("authorization", f"Bearer {token}")])
    assert status == 200
    seen = upstream.only_request()
    assert seen.values("x-api-key") == [SERVER_KEY.encode()]
    assert not seen.has("authorization")
    assert _clients(gateway, 1) == ["alice@example.com"]
    assert not leaks([token], _blob(seen), gateway.logs(), provider.logs())


def test_refused_tokens_get_401_in_the_providers_shape(
    gateway: Gateway, upstream: RecordingUpstream, provider: OpenIdProvider, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    other = OpenIdProvider(tmp_path / "other", PEOPLE).start()  # another issuer, another key
    try:
        _check_refusals(gateway, upstream, provider, other)
    finally:
        other.stop()


def _check_refusals(
    gateway: Gateway, upstream: RecordingUpstream, provider: OpenIdProvider, other: OpenIdProvider
) -> None:
    good = provider.token("alice-cli", AUDIENCE)
    head, payload, signature = good.split(".")
    tampered = ".".join(
        (head, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB"))
    )
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    as_bob = json.dumps({**claims, "email": "bob@example.com"}).encode()
    impostor = ".".join((head, base64.urlsafe_b64encode(as_bob).rstrip(b"=").decode(), signature))
    other_audience = provider.token("alice-cli", "https://another.test")
    short = provider.token("bob-cli", AUDIENCE)  # lives 2 s
    two_parts = f"{head}.{payload}"  # not shaped like a JWT: the processor refuses it
    now = int(time.time())
    person = {"iss": provider.issuer, "aud": AUDIENCE, "email": "alice@example.com"}
    not_yet = provider.forge({**person, "iat": now, "nbf": now + 600, "exp": now + 1200})
    assert _send(gateway, [("x-api-key", provider.forge({**person, "exp": now + 600}))])[0] == 200
    other_issuer = other.token("alice-cli", AUDIENCE)
    for token in (tampered, impostor, other_audience, two_parts, not_yet, other_issuer):
        status, body = _send(gateway, [("x-api-key", token)])
        assert status == 401, token[:10]
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"  # type: ignore[index]
    poll(lambda: _send(gateway, [("x-api-key", short)])[0] == 401, "refusing an expired token")
    assert upstream.requests == [] or all(
        not leaks(
            [tampered, impostor, other_audience, two_parts, not_yet, other_issuer, short], _blob(r)
        )
        for r in upstream.requests
    )


def test_keys_and_own_credentials_work_beside_tokens(
    gateway: Gateway, upstream: RecordingUpstream, provider: OpenIdProvider
) -> None:
    token = provider.token("alice-cli", AUDIENCE)
    assert _send(gateway, [("x-api-key", GATEWAY_KEY)])[0] == 200
    assert upstream.only_request().values("x-api-key") == [SERVER_KEY.encode()]
    upstream.clear()
    # A subscription user: the OAuth token stays in Authorization, the JWT in the access header.
    headers = [("authorization", f"Bearer {OAUTH}"), ("x-gateway-key", token)]
    assert _send(gateway, headers)[0] == 200
    seen = upstream.only_request()
    assert seen.values("authorization") == [f"Bearer {OAUTH}".encode()]
    assert not seen.has("x-gateway-key") and not seen.has("x-api-key")
    assert _clients(gateway, 2) == ["ci-bot", "alice@example.com"]
    assert not leaks([token, GATEWAY_KEY], _blob(seen), gateway.logs())


def _token_command(
    provider: OpenIdProvider, client_id: str, cache: Path, secret: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m extproc token …`` as Claude Code's apiKeyHelper would run it."""
    env = base_env({"OIDC_SECRET": secret or provider.secret_of(client_id)})
    return subprocess.run(
        [sys.executable, "-m", "extproc", "token", "--issuer", provider.issuer,
         "--client-id", client_id, "--secret-env", "OIDC_SECRET", "--audience", AUDIENCE,
         "--scope", "api", "--cache", str(cache)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_token_command_gets_caches_and_renews_a_token(
    gateway: Gateway, provider: OpenIdProvider, tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "alice.json"
    first = _token_command(provider, "alice-cli", cache)
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert _send(gateway, [("x-api-key", token)])[0] == 200
    assert cache.stat().st_mode & 0o777 == 0o600
    provider.stop()  # cached: no round trip to the provider
    assert _token_command(provider, "alice-cli", cache).stdout.strip() == token
    provider.start()
    short_cache = tmp_path / "cache" / "bob.json"
    short = _token_command(provider, "bob-cli", short_cache).stdout.strip()
    assert short
    # 2 s to live: renewed once less than a fifth of that is left, never handed out expired.
    poll(
        lambda: _token_command(provider, "bob-cli", short_cache).stdout.strip() != short, "renewed"
    )


def test_the_token_command_fails_in_one_line_naming_no_secret(
    provider: OpenIdProvider, tmp_path: Path
) -> None:
    wrong = "not-the-secret-of-alice-0123456789"
    done = _token_command(provider, "alice-cli", tmp_path / "t.json", secret=wrong)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"token: {provider.issuer}/token: HTTP 401 invalid_client\n"
    assert wrong not in done.stderr


def _ask(model: str, text: str = "hi") -> dict[str, Any]:
    return {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}


def test_a_teams_model_allowlist_is_enforced_in_envoy(
    gateway: Gateway, upstream: RecordingUpstream, provider: OpenIdProvider
) -> None:
    intern = [("x-api-key", provider.token("ivy-cli", AUDIENCE))]
    assert _send(gateway, intern, _ask(HAIKU))[0] == 200
    big = _ask(HAIKU, "x" * 300_000)  # past the listener's 32 KiB buffer: still read
    assert _send(gateway, intern, big)[0] == 200
    assert len(upstream.requests) == 2
    status, body = _send(gateway, intern, _ask("claude-opus-4-1"))
    assert status == 403
    assert body["error"]["type"] == "permission_error"
    assert "'claude-opus-4-1' is not allowed for your teams" in body["error"]["message"]
    # Only the top-level model counts: one quoted in a message cannot stand in for it.
    sneaky = _ask("claude-opus-4-1", f'"model": "{HAIKU}"')
    assert _send(gateway, intern, sneaky)[0] == 403
    # A model given twice: Envoy reads the last, as the providers' JSON parsers do.
    twice = f'{{"model": "{HAIKU}", "max_tokens": 8, "model": "claude-opus-4-1"}}'.encode()
    assert _send(gateway, [("content-type", "application/json"), *intern], twice)[0] == 403
    plain = [("content-type", "text/plain"), *intern]  # no JSON: no model known
    assert _send(gateway, plain, json.dumps(_ask(HAIKU)).encode())[0] == 403
    assert len(upstream.requests) == 2
    # Body-less requests name no model and spend nothing: listing models, Claude Code's hello.
    for method, path in (("GET", "/sso/v1/models"), ("HEAD", "/sso/api/hello")):
        assert raw_request(gateway.listener_port, path, intern, method=method).status == 200
    assert len(upstream.requests) == 4
    upstream.clear()
    # A gateway key's teams (from the keys file) have the same allowlists.
    bot = [("x-api-key", INTERN_KEY)]
    assert _send(gateway, bot, _ask("claude-opus-4-1"))[0] == 403
    assert _send(gateway, bot, _ask(HAIKU))[0] == 200
    # Teams without an allowlist use any model; so does a client's own key (it pays).
    alice = [("x-api-key", provider.token("alice-cli", AUDIENCE))]
    assert _send(gateway, alice, _ask("claude-opus-4-1"))[0] == 200
    assert _send(gateway, [("x-api-key", GATEWAY_KEY)], _ask("claude-opus-4-1"))[0] == 200
    assert _send(gateway, [("x-api-key", "sk-ant-api03-own")], _ask("claude-opus-4-1"))[0] == 200


def _jwks_fetches(gateway: Gateway) -> str:
    """Envoy's log lines about fetching the provider's keys in the background."""
    return "\n".join(line for line in gateway.logs().splitlines() if "Jwks async fetching" in line)


def test_a_rotated_signing_key_is_picked_up_without_a_restart(
    start_gateway: Callable[..., Gateway],
    upstream: RecordingUpstream,
    provider: OpenIdProvider,
) -> None:
    sso = {"issuer": provider.issuer, "audiences": [AUDIENCE], "cache_s": 10}
    gateway = start_gateway(
        [credential_route("sso", upstream.url())], env={"SSO_KEY": SERVER_KEY}, top={"sso": sso}
    )
    old = provider.token("alice-cli", AUDIENCE)
    assert _send(gateway, [("x-api-key", old)])[0] == 200
    provider.stop()  # the provider down: the keys Envoy holds keep working, past cache_s too
    poll(lambda: "failed" in _jwks_fetches(gateway), "a failed refetch of the keys", 40)
    assert _send(gateway, [("x-api-key", old)])[0] == 200
    provider.rotate()  # a new signing key; the old one is no longer published
    new = provider.token("alice-cli", AUDIENCE)
    assert new.split(".")[0] != old.split(".")[0]  # another kid
    poll(lambda: _send(gateway, [("x-api-key", new)])[0] == 200, "accepting the new key", 40)
    poll(lambda: _send(gateway, [("x-api-key", old)])[0] == 401, "refusing the retired key", 40)
    assert gateway.envoy_process is not None and gateway.envoy_process.poll() is None  # same Envoy


def test_sso_turned_on_and_off_by_a_live_reload(
    start_gateway: Callable[..., Gateway],
    upstream: RecordingUpstream,
    provider: OpenIdProvider,
    tmp_path: Path,
) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"ci-bot sha256:{key_digest(GATEWAY_KEY)}\n")
    top: dict[str, Any] = {"access": {"keys_file": str(keys_file)}}
    gateway = start_gateway(
        [credential_route("sso", upstream.url())], env={"SSO_KEY": SERVER_KEY}, top=top
    )
    token = provider.token("alice-cli", AUDIENCE)
    refused = provider.token("alice-cli", "https://another.test")
    gateway.reconfigure(top={**top, "sso": {"issuer": provider.issuer, "audiences": [AUDIENCE]}})
    poll(lambda: _send(gateway, [("x-api-key", refused)])[0] == 401, "checking tokens")
    upstream.clear()
    assert _send(gateway, [("x-api-key", token)])[0] == 200
    assert upstream.only_request().values("x-api-key") == [SERVER_KEY.encode()]
    gateway.reconfigure(top=top)  # off again: a token is just someone's own credential
    poll(lambda: _send(gateway, [("x-api-key", refused)])[0] == 200, "no longer checking")
    assert gateway.envoy_process is not None and gateway.envoy_process.poll() is None


def test_a_refused_model_releases_what_the_decision_held(
    start_gateway: Callable[..., Gateway],
    upstream: RecordingUpstream,
    provider: OpenIdProvider,
) -> None:
    """The 403 comes after the processor admitted the request (a concurrency slot): its usage
    record ends it, so the person's next request is not refused as over the limit."""
    sso = {"issuer": provider.issuer, "audiences": [AUDIENCE], "models": {"interns": [HAIKU]}}
    top = {
        "sso": sso,
        "metering": True,
        "metering_flush_ms": 50,
        "limits": {"default": {"concurrent": 1}},
    }
    gateway = start_gateway(
        [credential_route("sso", upstream.url())], env={"SSO_KEY": SERVER_KEY}, top=top
    )
    intern = [("x-api-key", provider.token("ivy-cli", AUDIENCE))]
    # One at a time: a slot is free again once the last request's record has arrived.
    for _ in range(3):
        poll(lambda: _send(gateway, intern, _ask("claude-opus-4-1"))[0] == 403, "a 403")
        poll(lambda: _send(gateway, intern, _ask(HAIKU))[0] == 200, "admitted again")
    assert "Deprecated field" not in gateway.logs()
