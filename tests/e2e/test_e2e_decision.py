"""The credential decision end to end: real Envoy, real processor, a recording upstream.

Every test runs twice, once with the fast path (Envoy sends requests that carry
a client credential straight to the upstream) and once with every request
asking the processor, so both paths are shown to give the upstream the same
bytes.
"""

from __future__ import annotations

import pytest
from harness import (
    Gateway,
    RecordedRequest,
    RecordingUpstream,
    credential_route,
    http1,
    http2,
    raw_h2_request,
    raw_request,
)
from harness.shared import one_upstream_gateway

SERVER_KEY = "sk-ant-api03-server-key-e2e"
OAUTH = "Bearer sk-ant-oat01-client-oauth-token"
CLIENT_KEY = "sk-ant-api03-client-own-key"

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


shared, gateway, upstream = one_upstream_gateway(
    "decision", lambda url: [credential_route("anthropic", url)], env={"ANTHROPIC_KEY": SERVER_KEY}
)


def assert_no_server_key(request: RecordedRequest) -> None:
    assert not any(SERVER_KEY.encode() in value for _, value in request.headers)


# -- the six cases ------------------------------------------------------------------------


def test_oauth_bearer_passes_through_without_x_api_key(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    with http1(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={}, headers={"authorization": OAUTH})
    assert reply.status_code == 200
    seen = upstream.only_request()
    assert seen.values("authorization") == [OAUTH.encode()]
    assert not seen.has("x-api-key")


def test_client_x_api_key_passes_through_unchanged(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    with http1(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={}, headers={"x-api-key": CLIENT_KEY})
    assert reply.status_code == 200
    seen = upstream.only_request()
    assert seen.values("x-api-key") == [CLIENT_KEY.encode()]
    assert not seen.has("authorization")


def test_request_without_credential_gets_the_server_key(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    with http1(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={"model": "m"})
    assert reply.status_code == 200
    seen = upstream.only_request()
    assert seen.values("x-api-key") == [SERVER_KEY.encode()]
    assert not seen.has("authorization")
    assert seen.body == b'{"model":"m"}'


def test_both_client_headers_pass_through_unchanged(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    with http1(gateway.base_url) as client:
        headers = {"authorization": OAUTH, "x-api-key": CLIENT_KEY}
        reply = client.post("/anthropic/v1/messages", json={}, headers=headers)
    assert reply.status_code == 200
    seen = upstream.only_request()
    assert seen.values("authorization") == [OAUTH.encode()]
    assert seen.values("x-api-key") == [CLIENT_KEY.encode()]


@pytest.mark.parametrize("value", ["sk-ant-token-without-scheme", "Token abc", "bearer\tx"])
def test_authorization_with_any_token_passes_through_unchanged(
    gateway: Gateway, upstream: RecordingUpstream, value: str
) -> None:
    reply = raw_request(gateway.listener_port, "/anthropic/v1/messages", [("authorization", value)])
    assert reply.status == 200
    seen = upstream.only_request()
    assert seen.values("authorization") == [value.encode()]
    assert not seen.has("x-api-key")


def test_prefix_is_replaced_and_host_names_the_upstream(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    with http1(gateway.base_url) as client:
        client.get("/anthropic/v1/models?limit=2", headers={"host": "attacker.example"})
    seen = upstream.only_request()
    assert seen.target == "/v1/models?limit=2"
    assert seen.values("host") == [f"127.0.0.1:{upstream.port}".encode()]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-API-KEY", CLIENT_KEY),
        ("X-Api-Key", CLIENT_KEY),
        ("x-API-key", CLIENT_KEY),
        ("AUTHORIZATION", OAUTH),
        ("Authorization", OAUTH),
        ("aUtHoRiZaTiOn", OAUTH),
    ],
)
def test_credential_header_in_any_case_over_http1_passes_through(
    gateway: Gateway, upstream: RecordingUpstream, name: str, value: str
) -> None:
    reply = raw_request(gateway.listener_port, "/anthropic/v1/messages", [(name, value)])
    assert reply.status == 200
    seen = upstream.only_request()
    assert seen.values(name) == [value.encode()]
    assert_no_server_key(seen)
    other = "x-api-key" if name.lower() == "authorization" else "authorization"
    assert not seen.has(other)


@pytest.mark.parametrize(
    ("name", "value"),
    [("X-Api-Key", CLIENT_KEY), ("x-api-key", CLIENT_KEY), ("Authorization", OAUTH)],
)
def test_credential_header_from_an_http2_client_passes_through(
    gateway: Gateway, upstream: RecordingUpstream, name: str, value: str
) -> None:
    with http2(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={}, headers={name: value})
    assert reply.http_version == "HTTP/2"
    assert reply.status_code == 200
    seen = upstream.only_request()
    assert seen.values(name) == [value.encode()]
    assert_no_server_key(seen)


def test_http2_request_without_credential_gets_the_server_key(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    with http2(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={})
    assert reply.http_version == "HTTP/2"
    assert reply.status_code == 200
    assert upstream.only_request().values("x-api-key") == [SERVER_KEY.encode()]


@pytest.mark.parametrize(("name", "value"), [("X-Api-Key", CLIENT_KEY), ("AUTHORIZATION", OAUTH)])
def test_upper_case_header_name_over_http2_is_refused_before_any_upstream(
    gateway: Gateway, upstream: RecordingUpstream, name: str, value: str
) -> None:
    # HTTP/2 requires lower-case names (RFC 9113 §8.2.1): such a request is malformed.
    result = raw_h2_request(gateway.listener_port, "/anthropic/v1/messages", [(name, value)])
    assert result.refused
    assert upstream.requests == []


# -- blank, duplicated and odd headers ----------------------------------------------------


BLANK = {
    "empty-key": [("x-api-key", "")],
    "spaces-key": [("X-API-KEY", "   ")],
    "empty-auth": [("authorization", "")],
    "tab-auth": [("Authorization", " \t ")],
    "both-blank": [("authorization", ""), ("x-api-key", " ")],
    "two-blank-keys": [("x-api-key", ""), ("x-api-key", "")],
    "two-blank-auth": [("authorization", ""), ("authorization", " ")],
    # a scheme without a token, as an SDK sends for an empty token variable
    "bare-bearer": [("authorization", "Bearer")],
    "bare-bearer-space": [("Authorization", "Bearer   ")],
    "bare-basic": [("authorization", "basic")],
    "bare-bearer-blank-key": [("authorization", "Bearer "), ("x-api-key", "")],
}


@pytest.mark.parametrize("headers", BLANK.values(), ids=BLANK.keys())
def test_blank_credential_headers_get_the_server_key_and_are_dropped(
    gateway: Gateway, upstream: RecordingUpstream, headers: list[tuple[str, str]]
) -> None:
    reply = raw_request(gateway.listener_port, "/anthropic/v1/messages", headers)
    assert reply.status == 200
    seen = upstream.only_request()
    assert seen.values("x-api-key") == [SERVER_KEY.encode()]
    assert not seen.has("authorization")


@pytest.mark.parametrize("name", ["authorization", "x-api-key"])
def test_blank_credential_over_http2_gets_the_server_key_and_is_dropped(
    gateway: Gateway, upstream: RecordingUpstream, name: str
) -> None:
    result = raw_h2_request(gateway.listener_port, "/anthropic/v1/messages", [(name, "")])
    assert result.status == 200
    seen = upstream.only_request()
    assert seen.values("x-api-key") == [SERVER_KEY.encode()]
    assert not seen.has("authorization")


def test_two_client_keys_pass_through_both_in_order(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    headers = [("x-api-key", "first-key"), ("X-Api-Key", "second-key")]
    assert raw_request(gateway.listener_port, "/anthropic/v1/messages", headers).status == 200
    seen = upstream.only_request()
    assert seen.values("x-api-key") == [b"first-key", b"second-key"]
    assert_no_server_key(seen)


def test_blank_then_filled_client_key_passes_through_untouched(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    headers = [("x-api-key", ""), ("x-api-key", CLIENT_KEY)]
    assert raw_request(gateway.listener_port, "/anthropic/v1/messages", headers).status == 200
    seen = upstream.only_request()
    assert seen.values("x-api-key") == [b"", CLIENT_KEY.encode()]
    assert_no_server_key(seen)


@pytest.mark.parametrize(
    ("headers", "merged"),
    [
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], b"Bearer a,Bearer b"),
        ([("authorization", ""), ("Authorization", OAUTH)], OAUTH.encode()),
    ],
    ids=["two-tokens", "blank-then-token"],
)
def test_repeated_authorization_passes_through_as_envoy_merged_it(
    gateway: Gateway, upstream: RecordingUpstream, headers: list[tuple[str, str]], merged: bytes
) -> None:
    assert raw_request(gateway.listener_port, "/anthropic/v1/messages", headers).status == 200
    seen = upstream.only_request()
    assert seen.values("authorization") == [merged]
    assert not seen.has("x-api-key")


@pytest.mark.parametrize(
    ("credential", "keys_upstream"),
    [
        ([], [SERVER_KEY]),
        ([("x-api-key", CLIENT_KEY)], [CLIENT_KEY]),
        ([("authorization", OAUTH)], []),
    ],
    ids=["injected", "client-key", "oauth"],
)
def test_non_utf8_bytes_in_other_headers_arrive_byte_for_byte(
    gateway: Gateway,
    upstream: RecordingUpstream,
    credential: list[tuple[str, str]],
    keys_upstream: list[str],
) -> None:
    odd = [("x-note", b"caf\xe9 \xff\xfe"), ("X-Latin", b"\xe9t\xe9")]
    reply = raw_request(gateway.listener_port, "/anthropic/v1/messages", [*odd, *credential])
    assert reply.status == 200
    seen = upstream.only_request()
    assert seen.values("x-note") == [b"caf\xe9 \xff\xfe"]
    assert seen.values("x-latin") == [b"\xe9t\xe9"]
    assert seen.values("x-api-key") == [key.encode() for key in keys_upstream]


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-api-key", b"sk-\xe9\xff-client"), ("authorization", b"Bearer \xe9\xe9\xe9")],
)
def test_non_utf8_client_credential_passes_through_byte_for_byte(
    gateway: Gateway, upstream: RecordingUpstream, name: str, value: bytes
) -> None:
    assert (
        raw_request(gateway.listener_port, "/anthropic/v1/messages", [(name, value)]).status == 200
    )
    seen = upstream.only_request()
    assert seen.values(name) == [value]
    assert_no_server_key(seen)


def test_server_key_never_reaches_logs_or_the_client(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    with http1(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/log-check", json={})
    assert upstream.only_request().values("x-api-key") == [SERVER_KEY.encode()]
    assert SERVER_KEY not in reply.text
    assert not any(SERVER_KEY in value for value in reply.headers.values())
    gateway.wait_access_log(lambda entry: entry.get("path") == "/anthropic/v1/log-check")
    assert SERVER_KEY not in gateway.logs()
    assert SERVER_KEY not in gateway.config_path.read_text()
    assert SERVER_KEY not in gateway.bootstrap_path.read_text()
