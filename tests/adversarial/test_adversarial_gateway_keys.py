"""Gateway client keys through real Envoy: who may spend the server key, and where keys go.

One shared gateway per path (fast path on, and every request through the
processor) with four routes:

- ``keyed``: the top-level ``access`` (default policy: client credentials pass without a key);
- ``strict``: ``for_client_credentials: true`` and OpenAI-style errors;
- ``open``: a credential route with ``access: false``;
- ``plain``: no credential at all (pass-through).

Every test also checks that no gateway key and no wrong server key reached
any upstream or came back to the client.
"""

from __future__ import annotations

import json
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
    free_port,
    http2,
    raw_request,
)
from harness.adversary import (
    NOT_SERVING,
    config_health,
    decisions,
    flatten,
    keygen,
    leaks,
    poll,
    replace_text,
    scrape,
    start_retrying,
    write_keys,
)
from harness.shared import running_upstreams

from extproc.policy.access import read_keys

ALICE, BOB = "gk-alice-adversarial-key-0001", "gk-bob-adversarial-key-0002"
KEYS = {"alice": ALICE, "bob": BOB}
SERVER_KEYS = {
    "keyed": "sk-keyed-server-secret",
    "strict": "sk-strict-server-secret",
    "open": "sk-open-server-secret",
}
CLIENT_KEY = "sk-ant-api03-client-own-key"
OAUTH = "Bearer sk-ant-oat01-client-oauth"
SECRETS = [ALICE, BOB, *SERVER_KEYS.values()]
ROUTES = ("keyed", "strict", "open", "plain")

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


class Setup:
    """The shared gateway, its upstreams (one per route) and its metrics port."""

    def __init__(self, gateway: Gateway, upstreams: dict[str, RecordingUpstream], metrics: int):
        self.gateway = gateway
        self.upstreams = upstreams
        self.metrics_port = metrics

    @property
    def port(self) -> int:
        return self.gateway.listener_port

    def all_requests(self) -> list[tuple[str, Any]]:
        return [(name, seen) for name, up in self.upstreams.items() for seen in up.requests]

    def assert_untouched(self) -> None:
        assert self.all_requests() == [], "an upstream was called for a denied request"

    def assert_no_key_went_astray(self, reply: RawResponse | None = None) -> None:
        """No gateway key upstream; a server key only at its own route's upstream; none back."""
        for name, seen in self.all_requests():
            assert not seen.has("x-gateway-key"), f"{name} received a gateway key header"
            wrong = [ALICE, BOB, *(v for k, v in SERVER_KEYS.items() if k != name)]
            assert leaks(wrong, flatten(seen.headers), seen.target, seen.body) == []
        if reply is not None:
            assert leaks(SECRETS, flatten(reply.headers), reply.body) == []


def build(workdir: Path, upstreams: dict[str, RecordingUpstream], fast_path: bool) -> Setup:
    keys_file = workdir / "keys.txt"
    write_keys(keys_file, KEYS)
    routes = [
        credential_route("keyed", upstreams["keyed"].url()),
        credential_route(
            "strict",
            upstreams["strict"].url(),
            access={"keys_file": str(keys_file), "for_client_credentials": True},
            error_style="openai",
        ),
        credential_route("open", upstreams["open"].url(), access=False),
        {"name": "plain", "prefix": "/plain/", "upstream": upstreams["plain"].url()},
    ]
    env = {f"{name.upper()}_KEY": value for name, value in SERVER_KEYS.items()}
    attempt = 0

    def start() -> Setup:
        nonlocal attempt
        attempt += 1
        metrics = free_port()
        top = {
            "access": {"keys_file": str(keys_file)},
            "metrics": {"address": "127.0.0.1", "port": metrics},
        }
        gateway = Gateway(
            workdir / f"gateway-{attempt}",
            routes,
            env=env,
            extproc={"fast_path": fast_path},
            top=top,
        )
        return Setup(gateway.start(), upstreams, metrics)

    return start_retrying(start)


@pytest.fixture(scope="module", params=FAST_PATH_MODES, ids=FAST_PATH_IDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    with running_upstreams(ROUTES) as upstreams:
        setup = build(tmp_path_factory.mktemp("keys"), upstreams, request.param)
        try:
            yield setup
        finally:
            setup.gateway.stop()


@pytest.fixture
def setup(shared: Setup, reuse: Callable[..., None]) -> Setup:
    reuse(shared.gateway, *shared.upstreams.values())
    return shared


def request(setup: Setup, route: str, headers: list[tuple[str, str | bytes]]) -> RawResponse:
    return raw_request(setup.port, f"/{route}/v1/messages", headers, method="POST", body=b"{}")


def assert_anthropic_401(reply: RawResponse) -> None:
    assert reply.status == 401
    assert reply.header("content-type") == b"application/json"
    body = reply.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert "x-gateway-key" in body["error"]["message"]


def assert_openai_401(reply: RawResponse) -> None:
    assert reply.status == 401
    assert reply.header("content-type") == b"application/json"
    assert reply.json()["error"]["code"] == "invalid_api_key"


# -- a valid key --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-gateway-key", ALICE),
        ("X-Gateway-Key", ALICE),
        ("X-GATEWAY-KEY", BOB),
        ("x-gateway-key", f"  {ALICE}\t"),
    ],
    ids=[
        "lower-case->injected",
        "mixed-case->injected",
        "upper-case->injected",
        "padded-value->injected",
    ],
)
def test_valid_gateway_key_gets_the_server_key_and_never_reaches_the_upstream(
    setup: Setup, name: str, value: str
) -> None:
    reply = request(setup, "keyed", [(name, value)])
    assert reply.status == 200
    seen = setup.upstreams["keyed"].only_request()
    assert seen.values("x-api-key") == [SERVER_KEYS["keyed"].encode()]
    setup.assert_no_key_went_astray(reply)


def test_valid_gateway_key_over_http2_gets_the_server_key_and_is_removed(setup: Setup) -> None:
    with http2(setup.gateway.base_url) as client:
        reply = client.post("/keyed/v1/messages", json={}, headers={"x-gateway-key": ALICE})
    assert (reply.http_version, reply.status_code) == ("HTTP/2", 200)
    assert setup.upstreams["keyed"].only_request().values("x-api-key") == [
        b"sk-keyed-server-secret"
    ]
    setup.assert_no_key_went_astray()
    assert leaks(SECRETS, reply.content, flatten(reply.headers.raw)) == []


# -- a missing or invalid key -------------------------------------------------------------

DENIED = {
    "missing->401": [],
    "wrong-key->401": [("x-gateway-key", "gk-not-a-real-key")],
    "empty->401": [("x-gateway-key", "")],
    "whitespace->401": [("x-gateway-key", "   ")],
    "truncated->401": [("x-gateway-key", ALICE[:-1])],
    "extended->401": [("x-gateway-key", ALICE + "x")],
    "other-case->401": [("x-gateway-key", ALICE.upper())],
    "the-hash-line->401": [("x-gateway-key", "sha256:" + "0" * 64)],
    "valid-and-wrong->401": [("x-gateway-key", "gk-wrong"), ("x-gateway-key", ALICE)],
    "two-keys-in-one-value->401": [("x-gateway-key", f"{ALICE},{BOB}")],
    "non-utf8->401": [("x-gateway-key", b"gk-\xff\xfe\xe9")],
    "key-in-another-header->401": [("x-gateway-keys", ALICE), ("gateway-key", ALICE)],
    "blank-client-credential->401": [("x-api-key", " "), ("authorization", "Bearer ")],
}


@pytest.mark.parametrize("headers", DENIED.values(), ids=DENIED.keys())
def test_missing_or_invalid_gateway_key_gets_401_json_and_no_upstream_call(
    setup: Setup, headers: list[tuple[str, str | bytes]]
) -> None:
    reply = request(setup, "keyed", headers)
    assert_anthropic_401(reply)
    setup.assert_untouched()
    assert leaks(SECRETS, flatten(reply.headers), reply.body) == []


def test_invalid_gateway_key_over_http2_gets_401_json_and_no_upstream_call(setup: Setup) -> None:
    with http2(setup.gateway.base_url) as client:
        reply = client.post("/keyed/v1/messages", json={}, headers={"x-gateway-key": "gk-nope"})
    assert (reply.http_version, reply.status_code) == ("HTTP/2", 401)
    assert reply.json()["error"]["type"] == "authentication_error"
    setup.assert_untouched()


# -- the gateway key header never goes upstream -------------------------------------------

FORWARDED = {
    "keyed-injected": ("keyed", [("x-gateway-key", ALICE)], "x-api-key", SERVER_KEYS["keyed"]),
    "keyed-client-key-and-gateway-key": (
        "keyed", [("x-api-key", CLIENT_KEY), ("x-gateway-key", ALICE)], "x-api-key", CLIENT_KEY),
    "keyed-client-key-and-wrong-gateway-key": (
        "keyed", [("x-api-key", CLIENT_KEY), ("x-gateway-key", "gk-wrong")], "x-api-key", CLIENT_KEY),
    "keyed-oauth-and-two-gateway-keys": (
        "keyed", [("authorization", OAUTH), ("x-gateway-key", ALICE), ("X-Gateway-Key", BOB)],
        "authorization", OAUTH),
    "strict-client-key-and-gateway-key": (
        "strict", [("x-api-key", CLIENT_KEY), ("x-gateway-key", BOB)], "x-api-key", CLIENT_KEY),
    "open-route-without-access": (
        "open", [("x-gateway-key", ALICE)], "x-api-key", SERVER_KEYS["open"]),
    "plain-route-without-credential": ("plain", [("X-Gateway-Key", ALICE)], "x-api-key", None),
    "plain-route-client-key": (
        "plain", [("x-api-key", CLIENT_KEY), ("x-gateway-key", BOB)], "x-api-key", CLIENT_KEY),
}  # fmt: skip


@pytest.mark.parametrize(
    ("route", "headers", "credential", "value"), FORWARDED.values(), ids=FORWARDED.keys()
)
def test_gateway_key_header_is_removed_before_every_upstream(
    setup: Setup,
    route: str,
    headers: list[tuple[str, str]],
    credential: str,
    value: str | None,
) -> None:
    reply = request(setup, route, headers)
    assert reply.status == 200
    seen = setup.upstreams[route].only_request()
    assert seen.values(credential) == ([value.encode()] if value else [])
    assert not seen.has("x-gateway-key")
    setup.assert_no_key_went_astray(reply)


# -- gateway keys in the standard credential slots (x-api-key, Authorization: Bearer) ---------

SLOT_ACCEPTED = {
    "keyed-x-api-key": ("keyed", [("x-api-key", ALICE)], "x-api-key", SERVER_KEYS["keyed"]),
    "keyed-upper-case-name": ("keyed", [("X-API-KEY", BOB)], "x-api-key", SERVER_KEYS["keyed"]),
    "keyed-bearer": ("keyed", [("authorization", f"Bearer {ALICE}")], "x-api-key", SERVER_KEYS["keyed"]),
    "keyed-upper-case-scheme": ("keyed", [("Authorization", f"BEARER {BOB}")], "x-api-key", SERVER_KEYS["keyed"]),
    "keyed-same-key-twice": (
        "keyed", [("x-api-key", ALICE), ("x-gateway-key", ALICE)], "x-api-key", SERVER_KEYS["keyed"]),
    "keyed-oauth-plus-key-in-x-api-key": (
        "keyed", [("authorization", OAUTH), ("x-api-key", ALICE)], "authorization", OAUTH),
    "strict-x-api-key": ("strict", [("x-api-key", BOB)], "x-api-key", SERVER_KEYS["strict"]),
    "plain-x-api-key": ("plain", [("x-api-key", ALICE)], "x-api-key", None),
    "plain-bearer-beside-client-key": (
        "plain", [("authorization", f"Bearer {ALICE}"), ("x-api-key", CLIENT_KEY)], "x-api-key", CLIENT_KEY),
}  # fmt: skip


@pytest.mark.parametrize(
    ("route", "headers", "credential", "value"), SLOT_ACCEPTED.values(), ids=SLOT_ACCEPTED.keys()
)
def test_valid_gateway_key_in_a_credential_slot_is_removed_and_spends_the_server_key(
    setup: Setup, route: str, headers: list[tuple[str, str]], credential: str, value: str | None
) -> None:
    reply = request(setup, route, headers)
    assert reply.status == 200
    seen = setup.upstreams[route].only_request()
    assert seen.values(credential) == ([value.encode()] if value else [])
    if credential == "x-api-key":
        assert seen.values("authorization") == []
    setup.assert_no_key_went_astray(reply)


SLOT_DENIED = {
    "keyed-typo-in-x-api-key": ("keyed", [("x-api-key", "gk-typo")]),
    "keyed-typo-as-bearer": ("keyed", [("authorization", "Bearer gk-typo")]),
    "keyed-typo-beside-oauth": ("keyed", [("authorization", OAUTH), ("x-api-key", "gk-typo")]),
    "keyed-typo-beside-client-key": ("keyed", [("x-api-key", CLIENT_KEY), ("authorization", "Bearer gk-x")]),
    "keyed-two-different-keys": ("keyed", [("x-api-key", ALICE), ("authorization", f"Bearer {BOB}")]),
    "keyed-valid-then-typo-copy": ("keyed", [("x-api-key", ALICE), ("x-api-key", "gk-typo")]),
    "keyed-slot-and-access-header-disagree": ("keyed", [("x-api-key", ALICE), ("x-gateway-key", BOB)]),
    "keyed-upper-case-name-typo": ("keyed", [("X-Api-Key", "gk-typo")]),
    "strict-typo-as-bearer": ("strict", [("authorization", "Bearer gk-typo")]),
    "open-route-has-no-keys": ("open", [("x-api-key", ALICE)]),
    "open-route-bearer-key": ("open", [("authorization", f"Bearer {ALICE}")]),
    "plain-route-typo": ("plain", [("x-api-key", "gk-typo")]),
    "plain-route-typo-beside-oauth": ("plain", [("authorization", OAUTH), ("x-api-key", "gk-typo")]),
}  # fmt: skip


@pytest.mark.parametrize(("route", "headers"), SLOT_DENIED.values(), ids=SLOT_DENIED.keys())
def test_a_gateway_key_prefix_that_is_not_a_valid_key_gets_401_and_never_goes_upstream(
    setup: Setup, route: str, headers: list[tuple[str, str]]
) -> None:
    reply = request(setup, route, headers)
    assert reply.status == 401
    assert reply.header("content-type") == b"application/json"
    setup.assert_untouched()
    assert leaks([*SECRETS, "gk-typo"], flatten(reply.headers), reply.body) == []


@pytest.mark.parametrize("value", [ALICE, "gk-typo"], ids=["valid", "invalid"])
def test_gateway_key_in_x_api_key_over_http2_never_goes_upstream(setup: Setup, value: str) -> None:
    with http2(setup.gateway.base_url) as client:
        reply = client.post("/keyed/v1/messages", json={}, headers={"x-api-key": value})
    assert reply.http_version == "HTTP/2"
    assert reply.status_code == (200 if value == ALICE else 401)
    if value == ALICE:
        assert setup.upstreams["keyed"].only_request().values("x-api-key") == [
            SERVER_KEYS["keyed"].encode()
        ]
    else:
        setup.assert_untouched()
    setup.assert_no_key_went_astray()


def test_gateway_key_on_an_unknown_path_goes_nowhere(setup: Setup) -> None:
    reply = request(setup, "nowhere", [("x-gateway-key", ALICE)])
    assert reply.status == 404
    setup.assert_untouched()


# -- client credentials: the documented policy --------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-api-key", CLIENT_KEY), ("authorization", OAUTH)],
    ids=["client-key->passes", "oauth->passes"],
)
def test_client_credential_without_a_gateway_key_passes_by_default(
    setup: Setup, name: str, value: str
) -> None:
    reply = request(setup, "keyed", [(name, value)])
    assert reply.status == 200
    seen = setup.upstreams["keyed"].only_request()
    assert seen.values(name) == [value.encode()]
    assert leaks([SERVER_KEYS["keyed"]], flatten(seen.headers)) == []
    setup.assert_no_key_went_astray(reply)


@pytest.mark.parametrize(
    "headers",
    [
        [("x-api-key", CLIENT_KEY)],
        [("authorization", OAUTH)],
        [("x-api-key", CLIENT_KEY), ("x-gateway-key", "gk-wrong")],
        [("authorization", OAUTH), ("x-gateway-key", "")],
    ],
    ids=[
        "client-key->401",
        "oauth->401",
        "client-key-wrong-gateway-key->401",
        "oauth-blank-gateway-key->401",
    ],
)
def test_client_credential_without_a_valid_gateway_key_is_denied_when_keys_are_required_for_them(
    setup: Setup, headers: list[tuple[str, str]]
) -> None:
    reply = request(setup, "strict", headers)
    assert_openai_401(reply)
    setup.assert_untouched()


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-api-key", CLIENT_KEY), ("authorization", OAUTH)],
    ids=["client-key->passes", "oauth->passes"],
)
def test_client_credential_with_a_valid_gateway_key_passes_when_keys_are_required_for_them(
    setup: Setup, name: str, value: str
) -> None:
    reply = request(setup, "strict", [(name, value), ("x-gateway-key", ALICE)])
    assert reply.status == 200
    seen = setup.upstreams["strict"].only_request()
    assert seen.values(name) == [value.encode()]
    setup.assert_no_key_went_astray(reply)


def test_strict_route_without_any_credential_and_a_valid_key_gets_its_server_key(
    setup: Setup,
) -> None:
    reply = request(setup, "strict", [("x-gateway-key", BOB)])
    assert reply.status == 200
    assert setup.upstreams["strict"].only_request().values("x-api-key") == [
        SERVER_KEYS["strict"].encode()
    ]
    setup.assert_no_key_went_astray(reply)


# -- metrics and logs name the client, never the key ----------------------------------------


def test_metrics_and_access_log_show_the_client_name_never_the_key(setup: Setup) -> None:
    before = decisions(scrape(setup.metrics_port))
    sent = [("keyed", [("x-gateway-key", ALICE)]), ("keyed", [("x-gateway-key", BOB)]),
            ("keyed", [("x-gateway-key", BOB)]), ("keyed", [("x-gateway-key", "gk-wrong")]),
            ("strict", [("x-gateway-key", ALICE)])]  # fmt: skip
    statuses = [request(setup, route, headers).status for route, headers in sent]
    assert statuses == [200, 200, 200, 401, 200]
    expected = {  # no client has limits of its own: one series for all (the access log names them)
        ("keyed", "injected", "(other)"): 3,
        ("keyed", "denied", ""): 1,
        ("strict", "injected", "(other)"): 1,
    }

    def counted() -> bool:
        after = decisions(scrape(setup.metrics_port))
        return all(after.get(key, 0) - before.get(key, 0) == n for key, n in expected.items())

    poll(counted, "counted in gateway_decisions_total")
    text = scrape(setup.metrics_port)
    assert leaks(SECRETS, text) == []
    entry = setup.gateway.wait_access_log(
        lambda e: e.get("client") == "bob" and e.get("outcome") == "injected"
    )
    assert entry["credential_source"] == "injected"
    assert leaks([*SECRETS, CLIENT_KEY], setup.gateway.logs()) == []


# -- rotation: edits to the keys file apply without a restart -----------------------------


@pytest.fixture
def rotating(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream, tmp_path: Path
) -> tuple[Gateway, Path]:
    keys_file = tmp_path / "keys.txt"
    write_keys(keys_file, {"alice": ALICE})
    route = credential_route("keyed", upstream.url())
    gateway = start_gateway(
        [route],
        env={"KEYED_KEY": SERVER_KEYS["keyed"]},
        top={"access": {"keys_file": str(keys_file)}},
    )
    return gateway, keys_file


def status_with(gateway: Gateway, key: str) -> int:
    return raw_request(gateway.listener_port, "/keyed/v1/m", [("x-gateway-key", key)]).status


def test_keys_added_and_removed_in_the_keys_file_apply_without_a_restart(
    rotating: tuple[Gateway, Path], upstream: RecordingUpstream
) -> None:
    gateway, keys_file = rotating
    processor = gateway.extproc_process
    assert processor is not None
    assert status_with(gateway, ALICE) == 200
    carol = keygen("carol", keys_file)  # appended in place, as an operator would
    poll(lambda: status_with(gateway, carol) == 200, "accepting carol's new key")
    assert status_with(gateway, ALICE) == 200
    kept = [line for line in keys_file.read_text().splitlines() if not line.startswith("alice ")]
    replace_text(keys_file, "\n".join(kept) + "\n")  # only hashes are on file: keep carol's
    poll(lambda: status_with(gateway, ALICE) == 401, "refusing alice's removed key")
    assert status_with(gateway, carol) == 200
    assert gateway.extproc_process is processor and processor.poll() is None  # no restart
    for seen in upstream.requests:
        assert not seen.has("x-gateway-key")
        assert seen.values("x-api-key") == [SERVER_KEYS["keyed"].encode()]
    assert leaks([ALICE, carol], gateway.logs()) == []


def test_a_broken_keys_file_keeps_the_last_good_keys(
    rotating: tuple[Gateway, Path],
) -> None:
    gateway, keys_file = rotating
    keys_file.write_text(f"alice {ALICE}\n")  # a plain key pasted instead of its hash
    poll(lambda: config_health(gateway.extproc_address) == NOT_SERVING, "reporting the bad file")
    assert status_with(gateway, ALICE) == 200
    assert leaks([ALICE], gateway.logs()) == []
    write_keys(keys_file, {"bob": BOB})
    poll(lambda: status_with(gateway, BOB) == 200, "accepting bob once the file is good again")
    assert status_with(gateway, ALICE) == 401


def test_keygen_append_to_a_file_without_a_final_newline_adds_a_usable_line(
    tmp_path: Path,
) -> None:
    keys_file = tmp_path / "keys.txt"
    write_keys(keys_file, {"alice": ALICE})
    keys_file.write_text(keys_file.read_text().rstrip("\n"))  # as `printf` or a ConfigMap leaves it
    carol = keygen("carol", keys_file)
    assert sorted(i.name for i in read_keys(keys_file).by_digest.values()) == ["alice", "carol"]
    assert carol not in keys_file.read_text()


def test_denied_answer_body_is_valid_json_without_the_presented_key(setup: Setup) -> None:
    presented = "gk-attacker-guess-" + "z" * 40
    reply = request(setup, "keyed", [("x-gateway-key", presented)])
    assert reply.status == 401
    assert presented.encode() not in reply.body
    assert json.loads(reply.body)["type"] == "error"
