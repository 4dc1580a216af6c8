"""Several routes in one gateway: each key goes only where its route says.

Also: routes without a credential, secrets from files, an Authorization-style
provider, the static bootstrap, and what the fast path means when the
processor is down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import (
    FAST_PATH_IDS,
    FAST_PATH_MODES,
    Gateway,
    RecordingUpstream,
    credential_route,
    http1,
    http2,
    raw_request,
)
from harness.shared import running_upstreams

ALPHA_KEY = "sk-alpha-server-key-e2e"
BETA_KEY = "sk-beta-server-key-e2e"
OPENAI_KEY = "sk-openai-server-key-e2e"
FILE_KEY = "sk-file-server-key-e2e"
CLIENT_KEY = "sk-client-own-key-e2e"
OAUTH = "Bearer sk-ant-oat01-routes-client"

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


class Upstreams:
    """One recording upstream per route of the shared gateway."""

    def __init__(self, by_name: dict[str, RecordingUpstream]) -> None:
        self.by_name = by_name

    def __getattr__(self, name: str) -> RecordingUpstream:
        return self.by_name[name]


@pytest.fixture(scope="module", params=FAST_PATH_MODES, ids=FAST_PATH_IDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Upstreams]]:
    workdir = tmp_path_factory.mktemp("routes")
    (workdir / "secrets").mkdir()
    (workdir / "secrets" / "file-key").write_text(FILE_KEY + "\n")
    with running_upstreams(("alpha", "beta", "openai", "plain", "file")) as by_name:
        upstreams = Upstreams(by_name)
        routes = gateway_routes(upstreams)
        env = {"ALPHA_KEY": ALPHA_KEY, "BETA_KEY": BETA_KEY, "OPENAI_KEY": OPENAI_KEY}
        with Gateway(workdir, routes, env=env, extproc={"fast_path": request.param}) as gateway:
            yield gateway, upstreams


def gateway_routes(upstreams: Upstreams) -> list[dict[str, object]]:
    """Two Anthropic-style routes, an OpenAI-style one, one without a credential, a file secret."""
    return [
        credential_route("alpha", upstreams.alpha.url()),
        credential_route("beta", upstreams.beta.url()),
        credential_route(
            "openai",
            upstreams.openai.url() + "/v1",
            header="authorization",
            format="Bearer {secret}",
            client_credentials=["authorization"],
        ),
        {"name": "plain", "prefix": "/plain/", "upstream": upstreams.plain.url()},
        credential_route("file", upstreams.file.url(), {"file": "secrets/file-key"}),
    ]


@pytest.fixture
def gateway(shared: tuple[Gateway, Upstreams], reuse: Callable[..., None]) -> Gateway:
    gateway, upstreams = shared
    reuse(gateway, *upstreams.by_name.values())
    return gateway


@pytest.fixture
def upstreams(shared: tuple[Gateway, Upstreams], gateway: Gateway) -> Upstreams:
    return shared[1]


# -- two routes, two secrets ----------------------------------------------------------------


def confusing_requests(upstreams: Upstreams) -> list[tuple[str, list[tuple[str, str]]]]:
    """Requests that try to make one route's key go to the other route's upstream."""
    alpha_host = f"127.0.0.1:{upstreams.alpha.port}"
    beta_host = f"127.0.0.1:{upstreams.beta.port}"
    return [
        ("/alpha/v1/messages", []),
        ("/beta/v1/messages", []),
        ("/alpha/v1/messages", [("Host", beta_host)]),
        ("/beta/v1/messages", [("Host", alpha_host)]),
        ("/alpha/v1/messages", [("x-envoy-original-path", "/beta/v1/messages")]),
        ("/alpha/../beta/v1/messages", []),
        ("/beta/%2e%2e/alpha/v1/messages", []),
        ("/alpha/..%2fbeta/v1/messages", []),
        ("/ALPHA/v1/messages", []),
        ("/alpha/v1/messages", [("x-api-key", "")]),
        ("/beta/v1/messages", [("authorization", " ")]),
    ]


def test_each_upstream_only_ever_receives_its_own_key(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    for target, headers in confusing_requests(upstreams):
        raw_request(gateway.listener_port, target, headers)
    with http2(gateway.base_url) as client:
        for prefix in ("/alpha/", "/beta/"):
            client.get(prefix + "v1/models", headers={"host": "elsewhere.example"})
    for upstream, own, other in (
        (upstreams.alpha, ALPHA_KEY, BETA_KEY),
        (upstreams.beta, BETA_KEY, ALPHA_KEY),
    ):
        requests = upstream.requests
        assert requests, f"{upstream.name} was never reached"
        for seen in requests:
            assert seen.values("x-api-key") == [own.encode()]
            assert not any(other.encode() in value for _, value in seen.headers)


def test_unknown_prefix_gets_a_json_404_and_no_upstream_call(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    with http1(gateway.base_url) as client:
        reply = client.get("/nowhere/v1/messages")
    assert reply.status_code == 404
    assert reply.json()["type"] == "error"
    assert all(upstream.requests == [] for upstream in upstreams.by_name.values())


# -- a route without credential -------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [[], [("x-api-key", CLIENT_KEY)], [("authorization", OAUTH)], [("x-api-key", "")]],
    ids=["none", "client-key", "oauth", "blank-key"],
)
def test_route_without_credential_forwards_headers_unchanged(
    gateway: Gateway, upstreams: Upstreams, headers: list[tuple[str, str]]
) -> None:
    assert raw_request(gateway.listener_port, "/plain/v1/messages", headers).status == 200
    seen = upstreams.plain.only_request()
    for name in ("x-api-key", "authorization"):
        assert seen.values(name) == [value.encode() for key, value in headers if key == name]


# -- secrets from files ---------------------------------------------------------------------


def test_secret_file_with_trailing_newline_is_sent_without_it(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    with http1(gateway.base_url) as client:
        assert client.get("/file/v1/messages").status_code == 200
    assert upstreams.file.only_request().values("x-api-key") == [FILE_KEY.encode()]


# -- an Authorization-style provider --------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "authorization", "x_api_key"),
    [
        ([], [f"Bearer {OPENAI_KEY}"], []),
        ([("authorization", "Bearer sk-client-openai")], ["Bearer sk-client-openai"], []),
        ([("Authorization", "")], [f"Bearer {OPENAI_KEY}"], []),
        ([("authorization", ""), ("authorization", "")], [f"Bearer {OPENAI_KEY}"], []),
        ([("x-api-key", CLIENT_KEY)], [f"Bearer {OPENAI_KEY}"], [CLIENT_KEY]),
    ],
    ids=["none", "client-bearer", "blank", "two-blank", "x-api-key-is-not-a-credential-here"],
)
def test_authorization_style_route_injects_bearer_only_without_client_bearer(
    gateway: Gateway,
    upstreams: Upstreams,
    headers: list[tuple[str, str]],
    authorization: list[str],
    x_api_key: list[str],
) -> None:
    reply = raw_request(gateway.listener_port, "/openai/chat/completions", headers, method="POST")
    assert reply.status == 200
    seen = upstreams.openai.only_request()
    assert seen.path == "/v1/chat/completions"
    assert seen.values("authorization") == [value.encode() for value in authorization]
    assert seen.values("x-api-key") == [value.encode() for value in x_api_key]


# -- gateways of their own ------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\n\n"], ids=["lf", "crlf", "two-lf"])
def test_secret_file_given_by_absolute_path_is_trimmed(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream, tmp_path: Path, newline: str
) -> None:
    secret = tmp_path / "anthropic.key"
    secret.write_text(FILE_KEY + newline, newline="")
    route = credential_route("anthropic", upstream.url(), {"file": str(secret)})
    gateway = start_gateway([route])
    with http1(gateway.base_url) as client:
        assert client.get("/anthropic/v1/messages").status_code == 200
    assert upstream.only_request().values("x-api-key") == [FILE_KEY.encode()]


def test_static_bootstrap_makes_the_same_decisions(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream
) -> None:
    route = credential_route("anthropic", upstream.url())
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": ALPHA_KEY}, dynamic=False)
    assert "static_resources" in gateway.bootstrap_path.read_text()
    cases = [({}, "x-api-key", ALPHA_KEY), ({"x-api-key": CLIENT_KEY}, "x-api-key", CLIENT_KEY),
             ({"authorization": OAUTH}, "authorization", OAUTH)]  # fmt: skip
    with http1(gateway.base_url) as client:
        for headers, name, expected in cases:
            upstream.clear()
            assert client.get("/anthropic/v1/messages", headers=headers).status_code == 200
            assert upstream.only_request().values(name) == [expected.encode()]
            assert not upstream.only_request().has(
                "authorization" if name == "x-api-key" else "x-api-key"
            )


@pytest.mark.parametrize("fast_path", FAST_PATH_MODES, ids=FAST_PATH_IDS)
def test_with_the_processor_down_only_the_fast_path_forwards_client_credentials(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    fast_path: bool,
) -> None:
    keyed, plain = start_upstream("keyed-upstream"), start_upstream("plain-upstream")
    routes = [
        credential_route("anthropic", keyed.url()),
        {"name": "plain", "prefix": "/plain/", "upstream": plain.url()},
    ]
    gateway = start_gateway(
        routes, env={"ANTHROPIC_KEY": ALPHA_KEY}, extproc={"fast_path": fast_path}
    )
    gateway.stop_extproc()
    with http1(gateway.base_url) as client:
        own_key = client.get("/anthropic/v1/messages", headers={"x-api-key": CLIENT_KEY})
        no_key = client.get("/anthropic/v1/messages")
        unmanaged = client.get("/plain/v1/messages")
    # failure_mode closed: without the processor nothing is forwarded that needs a decision
    assert no_key.status_code >= 500
    assert unmanaged.status_code == 200  # the processor is never asked about this route
    if fast_path:
        assert own_key.status_code == 200
        assert keyed.only_request().values("x-api-key") == [CLIENT_KEY.encode()]
    else:
        assert own_key.status_code >= 500
        assert keyed.requests == []
    gateway.start_extproc()  # a restarted processor is used again
    keyed.clear()
    with http1(gateway.base_url) as client:
        assert client.get("/anthropic/v1/messages").status_code == 200
    assert keyed.only_request().values("x-api-key") == [ALPHA_KEY.encode()]
