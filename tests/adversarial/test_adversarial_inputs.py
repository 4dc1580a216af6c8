"""Hostile requests through real Envoy: odd headers, smuggling attempts, path and Host tricks.

One shared gateway per path (fast path on, and every request through the
processor) with two credential routes, each with its own upstream and key
(``alpha``, ``beta``, open to anyone so the key is at stake on every request),
a route guarded by gateway keys (``keyed``), and an ``elsewhere`` upstream no
route points at. Header sizes are limited to 16 KB so oversized requests are
read whole by Envoy and answered (not reset mid-send).

Each case's id says what must happen; whatever it is, every case also checks
that no key reached the wrong upstream (or ``elsewhere``) and that no key came
back to the client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from harness import (
    FAST_PATH_IDS,
    FAST_PATH_MODES,
    Gateway,
    RawResponse,
    RecordingUpstream,
    credential_route,
)
from harness.adversary import H2Reply, flatten, h2_request, http1_exact, leaks, write_keys
from harness.shared import running_upstreams

ALPHA_KEY = "sk-alpha-server-secret-adv"
BETA_KEY = "sk-beta-server-secret-adv"
KEYED_KEY = "sk-keyed-server-secret-adv"
GATEWAY_KEY = "gk-adversarial-inputs-key"
CLIENT_KEY = "sk-ant-api03-client-own"
OAUTH = "Bearer sk-ant-oat01-client"
OWN = {"alpha": ALPHA_KEY, "beta": BETA_KEY, "keyed": KEYED_KEY, "elsewhere": None}
SECRETS = [ALPHA_KEY, BETA_KEY, KEYED_KEY, GATEWAY_KEY]
HEADER_LIMIT_KB = 16

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes

Headers = Sequence[tuple[str | bytes, str | bytes]]


class Setup:
    def __init__(self, gateway: Gateway, upstreams: dict[str, RecordingUpstream]) -> None:
        self.gateway = gateway
        self.upstreams = upstreams

    @property
    def port(self) -> int:
        return self.gateway.listener_port

    def send(
        self,
        target: str,
        headers: Headers = (),
        *,
        host: str | None = "127.0.0.1",
        method: str = "GET",
        body: bytes = b"",
        version: str = "HTTP/1.1",
    ) -> RawResponse | None:
        """A raw HTTP/1.x request (``Host`` first unless None); None when Envoy reset it."""
        lines = [("Host", host), *headers] if host is not None else list(headers)
        return http1_exact(self.port, target, lines, method=method, body=body, version=version)

    def received(self) -> dict[str, list[object]]:
        return {name: up.requests for name, up in self.upstreams.items() if up.requests}

    def assert_keys_stayed_home(self, reply: RawResponse | H2Reply | None) -> None:
        """The invariant behind every case: keys only ever go to their own upstream."""
        assert self.upstreams["elsewhere"].requests == [], "a request reached a foreign host"
        for name, upstream in self.upstreams.items():
            for seen in upstream.requests:
                wrong = [key for key in SECRETS if key != OWN[name]]
                assert leaks(wrong, flatten(seen.headers), seen.target, seen.body) == [], name
        if reply is not None:
            assert leaks(SECRETS, flatten(reply.headers), reply.body) == []


@pytest.fixture(scope="module", params=FAST_PATH_MODES, ids=FAST_PATH_IDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("inputs")
    write_keys(workdir / "keys.txt", {"tester": GATEWAY_KEY})
    with running_upstreams(("alpha", "beta", "keyed", "elsewhere")) as upstreams:
        routes = [
            credential_route("alpha", upstreams["alpha"].url()),
            credential_route("beta", upstreams["beta"].url()),
            credential_route(
                "keyed", upstreams["keyed"].url(), access={"keys_file": str(workdir / "keys.txt")}
            ),
        ]
        env = {"ALPHA_KEY": ALPHA_KEY, "BETA_KEY": BETA_KEY, "KEYED_KEY": KEYED_KEY}
        gateway = Gateway(
            workdir / "gateway",
            routes,
            env=env,
            listener={"max_request_headers_kb": HEADER_LIMIT_KB},
            extproc={"fast_path": request.param},
        )
        with gateway:
            yield Setup(gateway, upstreams)


@pytest.fixture
def setup(shared: Setup, reuse: Callable[..., None]) -> Setup:
    reuse(shared.gateway, *shared.upstreams.values())
    return shared


@dataclass(frozen=True)
class Expect:
    """What one case must produce."""

    status: int | None  # None: refused (connection reset or stream reset)
    upstream: str | None = None  # which upstream gets the request (None: none does)
    api_key: Sequence[bytes] | None = None  # exact x-api-key values upstream, when checked
    authorization: Sequence[bytes] | None = None  # exact authorization values, when checked


def injected(route: str = "alpha") -> Expect:
    return Expect(200, route, [OWN[route].encode()], [])  # type: ignore[union-attr]


def client(api_key: Sequence[bytes] | None = None, authorization: Sequence[bytes] | None = None,
           route: str = "alpha") -> Expect:  # fmt: skip
    return Expect(200, route, api_key, authorization)


def refused(status: int | None) -> Expect:
    return Expect(status)


def check(setup: Setup, reply: RawResponse | H2Reply | None, expect: Expect) -> None:
    status = None if reply is None else reply.status
    assert status == expect.status, setup.received()
    if expect.upstream is None:
        assert setup.received() == {}
    else:
        assert list(setup.received()) == [expect.upstream]
        seen = setup.upstreams[expect.upstream].only_request()
        if expect.api_key is not None:
            assert seen.values("x-api-key") == list(expect.api_key)
        if expect.authorization is not None:
            assert seen.values("authorization") == list(expect.authorization)
        if expect.api_key is None or expect.api_key != [OWN[expect.upstream].encode()]:
            # the client paid: the server key must not be anywhere near the request
            assert leaks(SECRETS, flatten(seen.headers)) == []
    setup.assert_keys_stayed_home(reply)


# -- blank, whitespace, duplicated and mixed-case credential headers --------------------------

CREDENTIAL_HEADERS: dict[str, tuple[Headers, Expect]] = {
    "empty-key->injected": ([("x-api-key", "")], injected()),
    "whitespace-key->injected": ([("x-api-key", " \t  ")], injected()),
    "mixed-case-blank-key->injected": ([("X-Api-KEY", " ")], injected()),
    "blank-authorization->injected-and-dropped": ([("Authorization", "  ")], injected()),
    "bare-bearer->injected-and-dropped": ([("authorization", "Bearer ")], injected()),
    "bare-basic-tab->injected-and-dropped": ([("AUTHORIZATION", "basic\t")], injected()),
    "blank-both->injected-and-dropped": ([("x-api-key", ""), ("authorization", "Bearer")], injected()),
    "three-blank-keys->injected-once": (
        [("x-api-key", ""), ("X-API-KEY", " "), ("x-Api-key", "\t")], injected()),
    "blank-then-filled-key->client": (
        [("x-api-key", " "), ("X-Api-Key", CLIENT_KEY)], client([b"", CLIENT_KEY.encode()])),
    "filled-then-blank-key->client": (
        [("X-API-KEY", CLIENT_KEY), ("x-api-key", "")], client([CLIENT_KEY.encode(), b""])),
    "two-filled-keys-mixed-case->client": (
        [("X-API-KEY", "k1"), ("x-api-key", "k2")], client([b"k1", b"k2"])),
    "mixed-case-authorization->client": (
        [("aUtHoRiZaTiOn", OAUTH)], client([], [OAUTH.encode()])),
    "blank-key-with-oauth->client-nothing-dropped": (
        [("x-api-key", ""), ("authorization", OAUTH)], client([b""], [OAUTH.encode()])),
    "comma-only-key->client": ([("x-api-key", ",")], client([b","])),
    "bearer-comma->client": ([("authorization", "Bearer ,")], client([], [b"Bearer ,"])),
}  # fmt: skip


@pytest.mark.parametrize(
    ("headers", "expect"), CREDENTIAL_HEADERS.values(), ids=CREDENTIAL_HEADERS.keys()
)
def test_credential_header_variants_decide_as_the_id_says(
    setup: Setup, headers: Headers, expect: Expect
) -> None:
    check(setup, setup.send("/alpha/v1/messages", headers), expect)


# -- underscores in names ---------------------------------------------------------------------

UNDERSCORES = {
    "x_api_key->400": ("/alpha/v1/m", [("x_api_key", CLIENT_KEY)]),
    "X_Api_Key-mixed-case->400": ("/alpha/v1/m", [("X_Api_Key", CLIENT_KEY)]),
    "x_api_key-beside-a-blank-key->400": ("/alpha/v1/m", [("x-api-key", ""), ("x_api_key", "k")]),
    "blank-x_api_key->400": ("/alpha/v1/m", [("x_api_key", "")]),
    "x_gateway_key->400": ("/keyed/v1/m", [("x_gateway_key", GATEWAY_KEY)]),
    "other_underscore_header->400": ("/alpha/v1/m", [("x_note", "hello")]),
}


@pytest.mark.parametrize(("target", "headers"), UNDERSCORES.values(), ids=UNDERSCORES.keys())
def test_header_names_with_underscores_are_rejected_and_never_forwarded(
    setup: Setup, target: str, headers: Headers
) -> None:
    reply = setup.send(target, headers)
    check(setup, reply, refused(400))
    assert reply is not None and reply.json()["type"] == "error"


@pytest.mark.parametrize("name", ["x_api_key", "x_gateway_key"])
def test_underscore_header_over_http2_is_refused_before_any_upstream(
    setup: Setup, name: str
) -> None:
    reply = h2_request(setup.port, "/keyed/v1/m", [(name, GATEWAY_KEY)])
    assert reply.refused or reply.status == 400
    check(setup, None if reply.refused else reply, refused(None if reply.refused else 400))


# -- CR/LF and control characters ---------------------------------------------------------------

CONTROL = {
    # A bare LF ends a header line for Envoy's parser: the client has simply sent two headers,
    # and Envoy and the processor both see those two.
    "bare-lf-smuggles-a-client-key->client": (
        [("x-note", b"a\nx-api-key: smuggled")], client([b"smuggled"])),
    "bare-lf-smuggles-a-blank-key->injected-once": ([("x-note", b"a\nx-api-key: ")], injected()),
    "bare-lf-smuggles-beta-host->alpha-injected": (
        [("x-note", b"a\nhost: beta.example")], injected()),
    "bare-cr-inside-client-key->client-without-cr": ([("x-api-key", b"ab\rcd")], client([b"abcd"])),
    "obs-fold-after-blank-key->folded-value-is-client-key": (
        [("x-api-key", b"\r\n folded")], client([b"folded"])),
    "nul-in-key->400": ([("x-api-key", b"a\x00b")], refused(400)),
    "vertical-tab-key->400": ([("x-api-key", b"\x0b")], refused(400)),
    "form-feed-key->400": ([("x-api-key", b"\x0c")], refused(400)),
    "del-in-key->400": ([("x-api-key", b"a\x7fb")], refused(400)),
    "nul-in-gateway-key->400": ([("x-gateway-key", b"gk\x00")], refused(400)),
}  # fmt: skip


@pytest.mark.parametrize(("headers", "expect"), CONTROL.values(), ids=CONTROL.keys())
def test_control_characters_in_header_values_decide_as_the_id_says(
    setup: Setup, headers: Headers, expect: Expect
) -> None:
    reply = setup.send("/alpha/v1/messages", headers)
    check(setup, reply, expect)
    for upstream in setup.upstreams.values():
        for seen in upstream.requests:
            assert all(
                b"\r" not in v and b"\n" not in v and b"\0" not in v for _, v in seen.headers
            )


@pytest.mark.parametrize(
    ("target", "expect"),
    [("/alpha/v1\rx", refused(400)), ("/alpha/v1 HTTP/1.1\r\nx-api-key: x\r\nx-y: z", client([b"x"])),
     ("/alpha/v1%0d%0ax-api-key:%20x", injected())],
    ids=["raw-cr-in-target->400", "request-line-injection->parsed-as-a-client-key-header",
         "encoded-crlf-in-target->injected-path-stays-encoded"],
)  # fmt: skip
def test_cr_lf_in_the_request_target_never_splits_the_request(
    setup: Setup, target: str, expect: Expect
) -> None:
    check(setup, setup.send(target), expect)
    for seen in setup.upstreams["alpha"].requests:
        assert "\r" not in seen.target and "\n" not in seen.target


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-api-key", b"a\r\nx-injected: 1"), ("x-note", b"a\nx-api-key: smuggled"),
     ("x-api-key", b"a\x00b"), ("x-gateway-key", b"\r\n")],
    ids=["crlf-in-key->refused", "lf-in-other-header->refused", "nul-in-key->refused",
         "crlf-gateway-key->refused"],
)  # fmt: skip
def test_cr_lf_nul_in_http2_header_values_are_refused(
    setup: Setup, name: str, value: bytes
) -> None:
    reply = h2_request(setup.port, "/alpha/v1/m", [(name, value)])
    assert reply.refused or reply.status == 400
    assert setup.received() == {}
    setup.assert_keys_stayed_home(reply)


def test_request_smuggling_with_both_framings_is_rejected(setup: Setup) -> None:
    smuggled = b"0\r\n\r\nGET /beta/v1/m HTTP/1.1\r\nHost: x\r\n\r\n"
    # http1_exact adds Content-Length for the body: both framings at once
    reply = setup.send(
        "/alpha/v1/m", [("Transfer-Encoding", "chunked")], method="POST", body=smuggled
    )
    check(setup, reply, refused(400))


# -- oversized headers --------------------------------------------------------------------------

BIG = (HEADER_LIMIT_KB + 4) * 1024
SIZES = {
    "big-other-header->431": ("/alpha/v1/m", [("x-note", "a" * BIG)]),
    "big-client-key->431": ("/alpha/v1/m", [("x-api-key", "k" * BIG)]),
    "big-blank-key->431": ("/alpha/v1/m", [("x-api-key", " " * BIG)]),
    "big-gateway-key->431": ("/keyed/v1/m", [("x-gateway-key", "g" * BIG)]),
    "many-small-headers->431": ("/alpha/v1/m", [(f"x-h{i}", "v") for i in range(120)]),
    "many-credential-copies->431": ("/alpha/v1/m", [("x-api-key", "") for _ in range(120)]),
}


@pytest.mark.parametrize(("target", "headers"), SIZES.values(), ids=SIZES.keys())
def test_oversized_request_headers_get_431_json_and_no_upstream_call(
    setup: Setup, target: str, headers: Headers
) -> None:
    reply = setup.send(target, headers)
    check(setup, reply, refused(431))
    assert reply is not None and reply.json()["type"] == "error"


def test_headers_just_under_the_limit_are_served_normally(setup: Setup) -> None:
    reply = setup.send("/alpha/v1/m", [("x-note", "a" * (HEADER_LIMIT_KB - 4) * 1024)])
    check(setup, reply, injected())


def test_oversized_http2_headers_are_refused_before_any_upstream(setup: Setup) -> None:
    reply = h2_request(setup.port, "/alpha/v1/m", [("x-note", "a" * BIG)])
    assert reply.refused or reply.status == 431
    assert setup.received() == {}
    setup.assert_keys_stayed_home(reply)


# -- non-UTF-8 ----------------------------------------------------------------------------------

NON_UTF8 = {
    "latin1-client-key->client-byte-for-byte": (
        "/alpha/v1/m", [("x-api-key", b"sk-\xe9\xff")], client([b"sk-\xe9\xff"])),
    "latin1-oauth->client-byte-for-byte": (
        "/alpha/v1/m", [("authorization", b"Bearer \xfe\xff")], client([], [b"Bearer \xfe\xff"])),
    "latin1-nbsp-key->client": ("/alpha/v1/m", [("x-api-key", b"\xa0")], client([b"\xa0"])),
    "utf8-nbsp-key->client": ("/alpha/v1/m", [("x-api-key", b"\xc2\xa0")], client([b"\xc2\xa0"])),
    "zero-width-space-key->client": (
        "/alpha/v1/m", [("x-api-key", b"\xe2\x80\x8b")], client([b"\xe2\x80\x8b"])),
    "invalid-utf8-in-other-header->injected": ("/alpha/v1/m", [("x-note", b"\xc3\x28")], injected()),
    "invalid-utf8-gateway-key->401": ("/keyed/v1/m", [("x-gateway-key", b"gk-\xc3\x28")], refused(401)),
    "gateway-key-plus-latin1->401": (
        "/keyed/v1/m", [("x-gateway-key", GATEWAY_KEY.encode() + b"\xe9")], refused(401)),
    "valid-gateway-key-and-latin1-blank-looking-key->client": (
        "/keyed/v1/m", [("x-gateway-key", GATEWAY_KEY), ("x-api-key", b"\xa0")],
        client([b"\xa0"], route="keyed")),
}  # fmt: skip


@pytest.mark.parametrize(("target", "headers", "expect"), NON_UTF8.values(), ids=NON_UTF8.keys())
def test_non_utf8_header_values_decide_as_the_id_says(
    setup: Setup, target: str, headers: Headers, expect: Expect
) -> None:
    check(setup, setup.send(target, headers), expect)


def test_processor_keeps_serving_after_hostile_values(setup: Setup) -> None:
    for value in (b"\xff" * 200, b"\xc3", b"gk-\x80\x81", b" " * 1000):
        setup.send("/keyed/v1/m", [("x-gateway-key", value), ("authorization", value)])
    setup.send("/alpha/v1/m", [("x-api-key", b"\xff\xfe")])
    for upstream in setup.upstreams.values():
        upstream.clear()
    check(setup, setup.send("/keyed/v1/m", [("x-gateway-key", GATEWAY_KEY)]), injected("keyed"))


# -- Host / :authority spoofing -----------------------------------------------------------------


def spoofs(setup: Setup) -> dict[str, tuple[str, Headers, Expect]]:
    beta = f"127.0.0.1:{setup.upstreams['beta'].port}"
    elsewhere = f"127.0.0.1:{setup.upstreams['elsewhere'].port}"
    return {
        "beta-host-on-alpha-path->alpha-key-to-alpha": ("/alpha/v1/m", [("Host", beta)], injected()),
        "second-host-header-beta->alpha-key-to-alpha": (
            "/alpha/v1/m", [("Host", beta), ("Host", elsewhere)], injected()),
        "absolute-uri-naming-beta->alpha-key-to-alpha": (f"http://{beta}/alpha/v1/m", [], injected()),
        "absolute-uri-naming-elsewhere->alpha-key-to-alpha": (
            f"http://{elsewhere}/alpha/v1/m", [], injected()),
        "absolute-uri-with-beta-path->beta-key-to-beta": (
            "http://alpha.example/beta/v1/m", [], injected("beta")),
        "x-forwarded-host-beta->alpha-key-to-alpha": (
            "/alpha/v1/m", [("x-forwarded-host", beta), ("forwarded", f"host={beta}")], injected()),
        "x-envoy-original-path-beta->alpha-key-to-alpha": (
            "/alpha/v1/m", [("x-envoy-original-path", "/beta/v1/m")], injected()),
        "x-envoy-internal-and-route-hints->alpha-key-to-alpha": (
            "/alpha/v1/m", [("x-envoy-internal", "true"), ("x-envoy-upstream-alt-stat-name", "beta"),
                            ("x-envoy-original-url", f"http://{beta}/beta/v1")], injected()),
        "beta-host-with-blank-key->alpha-key-to-alpha": (
            "/alpha/v1/m", [("Host", beta), ("x-api-key", "")], injected()),
        "elsewhere-host-on-beta-path->beta-key-to-beta": (
            "/beta/v1/m", [("Host", elsewhere)], injected("beta")),
    }  # fmt: skip


SPOOF_IDS = [
    "beta-host-on-alpha-path->alpha-key-to-alpha",
    "second-host-header-beta->alpha-key-to-alpha",
    "absolute-uri-naming-beta->alpha-key-to-alpha",
    "absolute-uri-naming-elsewhere->alpha-key-to-alpha",
    "absolute-uri-with-beta-path->beta-key-to-beta",
    "x-forwarded-host-beta->alpha-key-to-alpha",
    "x-envoy-original-path-beta->alpha-key-to-alpha",
    "x-envoy-internal-and-route-hints->alpha-key-to-alpha",
    "beta-host-with-blank-key->alpha-key-to-alpha",
    "elsewhere-host-on-beta-path->beta-key-to-beta",
]


@pytest.mark.parametrize("case", SPOOF_IDS)
def test_host_spoofing_over_http1_never_moves_a_key_to_another_upstream(
    setup: Setup, case: str
) -> None:
    target, headers, expect = spoofs(setup)[case]
    own_host = any(str(name).lower() == "host" for name, _ in headers)
    reply = setup.send(target, headers, host=None if own_host else "127.0.0.1")
    check(setup, reply, expect)
    seen = setup.upstreams[expect.upstream or ""].only_request()
    assert seen.values("host") == [
        f"127.0.0.1:{setup.upstreams[expect.upstream or ''].port}".encode()
    ]


@pytest.mark.parametrize(
    ("path", "authority", "extra", "route"),
    [("/alpha/v1/m", "beta", [], "alpha"), ("/alpha/v1/m", "elsewhere", [], "alpha"),
     ("/alpha/v1/m", "alpha.example", [("host", "beta")], "alpha"),
     ("/beta/v1/m", "alpha", [("x-api-key", "")], "beta")],
    ids=["beta-authority-on-alpha-path->alpha-key-to-alpha",
         "elsewhere-authority-on-alpha-path->alpha-key-to-alpha",
         "host-header-differs-from-authority->alpha-key-to-alpha",
         "alpha-authority-on-beta-path-blank-key->beta-key-to-beta"],
)  # fmt: skip
def test_authority_spoofing_over_http2_never_moves_a_key_to_another_upstream(
    setup: Setup, path: str, authority: str, extra: Headers, route: str
) -> None:
    names = {"alpha", "beta", "elsewhere"}
    authority = f"127.0.0.1:{setup.upstreams[authority].port}" if authority in names else authority
    extra = [
        (k, f"127.0.0.1:{setup.upstreams[str(v)].port}" if v in names else v) for k, v in extra
    ]
    reply = h2_request(setup.port, path, extra, authority=authority)
    check(setup, reply, injected(route))


# -- path tricks --------------------------------------------------------------------------------

PATHS = {
    "double-slash-prefix->alpha": ("//alpha/v1/m", injected()),
    "inner-double-slash->alpha-merged": ("/alpha//v1//m", injected()),
    "dot-dot-into-beta->beta-key-to-beta": ("/alpha/../beta/v1/m", injected("beta")),
    "too-many-dot-dots->beta-key-to-beta": ("/alpha/../../../beta/v1/m", injected("beta")),
    "encoded-dots->beta-key-to-beta": ("/alpha/%2e%2e/beta/v1/m", injected("beta")),
    "upper-encoded-dots->beta-key-to-beta": ("/alpha/%2E%2E/beta/v1/m", injected("beta")),
    "dot-segments-back-into-alpha->alpha": ("/beta/./../alpha/v1/m", injected()),
    "backslash-dot-dot->beta-key-to-beta": ("/alpha\\..\\beta/v1/m", injected("beta")),
    "semicolon-segment->beta-key-to-beta": ("/alpha;/../beta/v1/m", injected("beta")),
    "encoded-letter-in-prefix->alpha": ("/%61lpha/v1/m", injected()),
    "encoded-slash-dot-dot->307-no-upstream": ("/alpha/..%2fbeta/v1/m", refused(307)),
    "encoded-slash-in-prefix->307-no-upstream": ("/alpha%2f..%2fbeta/v1/m", refused(307)),
    "upper-encoded-slash->307-no-upstream": ("/alpha/v1%2F..%2F..%2Fbeta/m", refused(307)),
    "double-encoded-dots->alpha-path-stays-encoded": ("/alpha/%252e%252e/beta/m", injected()),
    "dot-dot-to-root->404": ("/alpha/..", refused(404)),
    "upper-case-prefix->404": ("/ALPHA/v1/m", refused(404)),
    "bare-prefix->alpha": ("/alpha", injected()),
    "bare-prefix-with-query->alpha": ("/alpha?beta=1", injected()),
    "prefix-then-more-letters->404": ("/alphax/v1/m", refused(404)),
    "prefix-then-dash->404": ("/alpha-beta/v1/m", refused(404)),
    "fragment->400": ("/alpha/v1#/../../beta", refused(400)),
    "dot-dots-in-query->alpha-query-kept": ("/alpha/v1/m?next=/../beta/", injected()),
}


@pytest.mark.parametrize(("target", "expect"), PATHS.values(), ids=PATHS.keys())
def test_path_tricks_never_move_a_key_to_another_upstream(
    setup: Setup, target: str, expect: Expect
) -> None:
    reply = setup.send(target)
    check(setup, reply, expect)
    for name in ("alpha", "beta"):
        for seen in setup.upstreams[name].requests:
            assert not seen.path.startswith(("/alpha", "/beta")), "prefix not replaced"
            assert "/../" not in seen.path and "\\" not in seen.path
    if reply is not None and reply.status == 307:
        location = (reply.header("location") or b"").decode()
        assert "%2f" not in location.lower()  # the redirect names the unescaped path


@pytest.mark.parametrize(
    ("target", "route"),
    [("/alpha/../beta/v1/m", "beta"), ("/alpha/%2e%2e/beta/v1/m", "beta"), ("//beta//v1", "beta")],
    ids=["dot-dot->beta-key-to-beta", "encoded-dots->beta-key-to-beta", "double-slashes->beta"],
)
def test_path_tricks_over_http2_never_move_a_key_to_another_upstream(
    setup: Setup, target: str, route: str
) -> None:
    check(setup, h2_request(setup.port, target), injected(route))


# -- methods and protocol edges ----------------------------------------------------------------

PROTOCOL = {
    "http-1.0->426-no-upstream": ("/alpha/v1/m", {"version": "HTTP/1.0"}, [], 426),
    "missing-host->400-no-upstream": ("/alpha/v1/m", {"host": None}, [], 400),
    "websocket-upgrade->403-no-upstream": (
        "/alpha/v1/m", {}, [("Connection", "Upgrade"), ("Upgrade", "websocket")], 403),
    "asterisk-form-options->404-no-upstream": ("*", {"method": "OPTIONS"}, [], 404),
    "connect-to-beta->404-no-upstream": ("127.0.0.1:1", {"method": "CONNECT"}, [], 404),
}  # fmt: skip


@pytest.mark.parametrize(
    ("target", "options", "headers", "status"), PROTOCOL.values(), ids=PROTOCOL.keys()
)
def test_protocol_edge_requests_are_refused_before_any_upstream(
    setup: Setup, target: str, options: dict[str, Any], headers: Headers, status: int
) -> None:
    check(setup, setup.send(target, headers, **options), refused(status))


def test_h2c_upgrade_request_is_served_as_http1_with_the_right_key(setup: Setup) -> None:
    upgrade = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
               ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")]  # fmt: skip
    check(setup, setup.send("/alpha/v1/m", upgrade), injected())


@pytest.mark.parametrize("route", ["alpha", "keyed"])
def test_trace_on_a_credential_route_is_refused_so_no_upstream_can_echo_the_key(
    setup: Setup, route: str
) -> None:
    # TRACE asks the server to send the request back: with an injected key, the key.
    reply = setup.send(f"/{route}/v1/m", [("x-gateway-key", GATEWAY_KEY)], method="TRACE")
    assert reply is not None and 400 <= reply.status < 500
    assert setup.received() == {}


# -- an upstream that redirects elsewhere -------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize(
    ("headers", "api_key"),
    [([], ALPHA_KEY), ([("x-api-key", CLIENT_KEY)], CLIENT_KEY)],
    ids=["injected", "client-key"],
)
def test_upstream_redirect_to_another_host_goes_back_to_the_client_unfollowed(
    setup: Setup, status: int, headers: Headers, api_key: str
) -> None:
    foreign = f"http://127.0.0.1:{setup.upstreams['elsewhere'].port}/steal"
    reply = setup.send(
        f"/alpha/redirect?status={status}&location={foreign}", headers, method="POST", body=b"{}"
    )
    assert reply is not None and reply.status == status
    assert reply.header("location") == foreign.encode()
    assert setup.upstreams["alpha"].only_request().values("x-api-key") == [api_key.encode()]
    setup.assert_keys_stayed_home(reply)


@pytest.mark.parametrize(
    "location",
    ["/beta/v1/m", "http://127.0.0.1:{beta}/v1/m"],
    ids=["to-the-gateways-beta-route->302-unfollowed", "to-beta-upstream->302-unfollowed"],
)
def test_upstream_redirect_to_the_other_route_is_not_followed(setup: Setup, location: str) -> None:
    location = location.format(beta=setup.upstreams["beta"].port)
    reply = setup.send(f"/alpha/redirect?status=302&location={location}")
    assert reply is not None and reply.status == 302
    assert list(setup.received()) == ["alpha"]
    setup.assert_keys_stayed_home(reply)


def test_the_leak_check_fails_when_a_key_reaches_the_wrong_upstream(setup: Setup) -> None:
    """The leak check itself must fail on a leak: send beta's key to alpha as a client key."""
    setup.send("/alpha/v1/m", [("x-api-key", BETA_KEY)])
    with pytest.raises(AssertionError):
        setup.assert_keys_stayed_home(None)
