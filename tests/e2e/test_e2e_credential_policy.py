"""Credential policy per route through real Envoy: path-segment prefixes, placeholders, modes.

One shared gateway per path (fast path on, and every request through the
processor). Each route has its own recording upstream, so a test sees exactly
which credential reached which upstream, and that refused requests reached none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    FAST_PATH_IDS,
    FAST_PATH_MODES,
    Gateway,
    RawResponse,
    RecordingUpstream,
    credential_route,
    raw_request,
)
from harness.shared import running_upstreams

SERVER = {
    "anthropic": "sk-ant-server-policy",
    "thirdparty": "sk-third-party-server",
    "orgonly": "sk-org-only-server",
    "strictblank": "sk-strict-blank-server",
}
OAUTH = "Bearer sk-ant-oat01-client-subscription"
OWN_KEY = "sk-ant-api03-client-own"
ROUTES = ("anthropic", "openai", "thirdparty", "orgonly", "ownonly", "strictblank")

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def _with(route: dict[str, Any], **credential: Any) -> dict[str, Any]:
    route["credential"].update(credential)
    return route


def gateway_routes(upstreams: dict[str, RecordingUpstream]) -> list[dict[str, Any]]:
    return [
        credential_route("anthropic", upstreams["anthropic"].url(), prefix="/anthropic"),
        credential_route(
            "openai",
            upstreams["openai"].url() + "/v1",
            {"env": "ANTHROPIC_KEY"},
            prefix="/openai/",
            header="authorization",
            format="Bearer {secret}",
            client_credentials=["authorization"],
        ),
        _with(
            credential_route(
                "thirdparty",
                upstreams["thirdparty"].url(),
                header="authorization",
                format="Bearer {secret}",
            ),
            mode="replace_client",
        ),
        _with(credential_route("orgonly", upstreams["orgonly"].url()), mode="reject_client"),
        {
            "name": "ownonly",
            "prefix": "/ownonly/",
            "upstream": upstreams["ownonly"].url(),
            "credential": {"header": "x-api-key", "mode": "client_only"},
        },
        _with(credential_route("strictblank", upstreams["strictblank"].url()), placeholders=[]),
    ]


@pytest.fixture(scope="module", params=FAST_PATH_MODES, ids=FAST_PATH_IDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, dict[str, RecordingUpstream]]]:
    workdir: Path = tmp_path_factory.mktemp("policy")
    with running_upstreams(ROUTES) as upstreams:
        env = {f"{name.upper()}_KEY": value for name, value in SERVER.items()}
        top = {"placeholders": ["dummy", "sk-no-key-required"]}
        routes = gateway_routes(upstreams)
        with Gateway(
            workdir, routes, env=env, extproc={"fast_path": request.param}, top=top
        ) as gateway:
            yield gateway, upstreams


@pytest.fixture
def setup(
    shared: tuple[Gateway, dict[str, RecordingUpstream]], reuse: Callable[..., None]
) -> tuple[Gateway, dict[str, RecordingUpstream]]:
    gateway, upstreams = shared
    reuse(gateway, *upstreams.values())
    return shared


def send(
    gateway: Gateway, target: str, headers: list[tuple[str, str]], method: str = "POST"
) -> RawResponse:
    return raw_request(gateway.listener_port, target, headers, method=method, body=b"{}")


def nothing_reached(upstreams: dict[str, RecordingUpstream]) -> bool:
    return all(not upstream.requests for upstream in upstreams.values())


# -- the prefix is a path segment ------------------------------------------------------------

SEGMENTS = {
    "claude-code-first-request": ("HEAD", "/anthropic", "anthropic", "/"),
    "bare-prefix-with-query": ("GET", "/anthropic?beta=true", "anthropic", "/?beta=true"),
    "trailing-slash": ("GET", "/anthropic/", "anthropic", "/"),
    "below-the-prefix": ("POST", "/anthropic/v1/messages?beta=true", "anthropic", "/v1/messages?beta=true"),
    "upstream-path-bare": ("GET", "/openai", "openai", "/v1/"),
    "upstream-path-below": ("POST", "/openai/chat/completions", "openai", "/v1/chat/completions"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "target", "route", "upstream_target"), SEGMENTS.values(), ids=SEGMENTS.keys()
)
def test_a_prefix_matches_as_a_path_segment_with_and_without_the_trailing_slash(
    setup: tuple[Gateway, dict[str, RecordingUpstream]],
    method: str,
    target: str,
    route: str,
    upstream_target: str,
) -> None:
    gateway, upstreams = setup
    reply = send(gateway, target, [], method=method)
    assert reply.status == 200
    seen = upstreams[route].only_request()
    assert (seen.method, seen.target) == (method, upstream_target)


@pytest.mark.parametrize(
    "target", ["/anthropicx", "/anthropic-beta/v1/messages", "/openaiv1/chat", "/Anthropic"]
)
def test_a_longer_word_is_not_the_prefix(
    setup: tuple[Gateway, dict[str, RecordingUpstream]], target: str
) -> None:
    gateway, upstreams = setup
    assert send(gateway, target, []).status == 404
    assert nothing_reached(upstreams)


# -- placeholders -----------------------------------------------------------------------------

PLACEHOLDERS = {
    "x-api-key-dummy": ("anthropic", [("x-api-key", "dummy")], "x-api-key", SERVER["anthropic"]),
    "bearer-placeholder": (
        "anthropic", [("authorization", "Bearer sk-no-key-required")], "x-api-key", SERVER["anthropic"]),
    "openai-bearer-placeholder": (
        "openai", [("authorization", "Bearer sk-no-key-required")], "authorization", f"Bearer {SERVER['anthropic']}"),
    "not-a-placeholder-passes": ("anthropic", [("x-api-key", "dummy2")], "x-api-key", "dummy2"),
    "route-turned-placeholders-off": ("strictblank", [("x-api-key", "dummy")], "x-api-key", "dummy"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("route", "headers", "header", "value"), PLACEHOLDERS.values(), ids=PLACEHOLDERS.keys()
)
def test_a_placeholder_counts_as_no_credential(
    setup: tuple[Gateway, dict[str, RecordingUpstream]],
    route: str,
    headers: list[tuple[str, str]],
    header: str,
    value: str,
) -> None:
    gateway, upstreams = setup
    assert send(gateway, f"/{route}/v1/x", headers).status == 200
    seen = upstreams[route].only_request()
    assert seen.values(header) == [value.encode()]
    other = "authorization" if header == "x-api-key" else "x-api-key"
    assert seen.values(other) == []


# -- modes ------------------------------------------------------------------------------------

PASSED = {
    "replace-oauth-with-server": ("thirdparty", [("authorization", OAUTH)], {"authorization": f"Bearer {SERVER['thirdparty']}", "x-api-key": None}),
    "replace-own-key-with-server": ("thirdparty", [("x-api-key", OWN_KEY)], {"authorization": f"Bearer {SERVER['thirdparty']}", "x-api-key": None}),
    "replace-both": ("thirdparty", [("x-api-key", OWN_KEY), ("authorization", OAUTH)], {"authorization": f"Bearer {SERVER['thirdparty']}", "x-api-key": None}),
    "org-only-without-credential": ("orgonly", [], {"x-api-key": SERVER["orgonly"], "authorization": None}),
    "own-only-with-own-key": ("ownonly", [("x-api-key", OWN_KEY)], {"x-api-key": OWN_KEY, "authorization": None}),
    "own-only-with-oauth": ("ownonly", [("authorization", OAUTH)], {"authorization": OAUTH, "x-api-key": None}),
}  # fmt: skip


@pytest.mark.parametrize(("route", "headers", "expected"), PASSED.values(), ids=PASSED.keys())
def test_each_mode_sends_exactly_its_credential(
    setup: tuple[Gateway, dict[str, RecordingUpstream]],
    route: str,
    headers: list[tuple[str, str]],
    expected: dict[str, str | None],
) -> None:
    gateway, upstreams = setup
    assert send(gateway, f"/{route}/v1/x", headers).status == 200
    seen = upstreams[route].only_request()
    for header, value in expected.items():
        assert seen.values(header) == ([value.encode()] if value else [])


REFUSED = {
    "org-only-refuses-oauth": ("orgonly", [("authorization", OAUTH)], "organisation"),
    "org-only-refuses-own-key": ("orgonly", [("x-api-key", OWN_KEY)], "organisation"),
    "own-only-without-credential": ("ownonly", [], "only your own"),
    "own-only-with-blank": ("ownonly", [("x-api-key", " ")], "only your own"),
}  # fmt: skip


@pytest.mark.parametrize(("route", "headers", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_credential_gets_a_clear_401_and_no_upstream_call(
    setup: tuple[Gateway, dict[str, RecordingUpstream]],
    route: str,
    headers: list[tuple[str, str]],
    message: str,
) -> None:
    gateway, upstreams = setup
    reply = send(gateway, f"/{route}/v1/x", headers)
    assert reply.status == 401
    body = reply.json()
    assert body["error"]["type"] == "authentication_error"
    assert message in body["error"]["message"]
    assert nothing_reached(upstreams)
    for secret in (OAUTH, OWN_KEY, *SERVER.values()):
        assert secret.encode() not in reply.body


def test_the_fast_path_skips_the_processor_only_for_genuine_provider_credentials(
    start_gateway: Callable[..., Gateway], start_upstream: Callable[..., RecordingUpstream]
) -> None:
    """With the processor stopped, only what Envoy passes by itself still gets through."""
    upstream = start_upstream("anthropic-upstream")
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway(
        [route], env={"ANTHROPIC_KEY": SERVER["anthropic"]}, top={"placeholders": ["dummy"]}
    )
    gateway.stop_extproc()
    skipped = {"own key": [("x-api-key", OWN_KEY)], "oauth": [("authorization", OAUTH)]}
    asked = {
        "nothing": [],
        "placeholder": [("x-api-key", "dummy")],
        "gateway key": [("x-api-key", "gk-anything")],
        "bearer gateway key": [("authorization", "Bearer gk-anything")],
        "oauth beside a gateway key": [("authorization", OAUTH), ("x-api-key", "gk-x")],
        "own key beside a bearer gateway key": [
            ("x-api-key", OWN_KEY),
            ("authorization", "bearer gk-x"),
        ],
    }
    for name, headers in skipped.items():
        assert send(gateway, "/anthropic/v1/messages", headers).status == 200, name
    for name, headers in asked.items():
        assert send(gateway, "/anthropic/v1/messages", headers).status >= 500, name
    assert len(upstream.requests) == len(skipped)
