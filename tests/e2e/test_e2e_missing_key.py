"""No server key: a startup error that names the source, or (optional) a 401 from the gateway.

A missing required secret must stop ``serve`` before it answers anything, and
say which variable or file is missing without printing any secret it did read.
An ``optional: true`` secret instead keeps the route open for clients that
bring their own credential and answers the others itself, in the provider's
JSON error shape, without calling the upstream.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from harness import (
    Gateway,
    RecordingUpstream,
    credential_route,
    free_port,
    raw_request,
    run_serve,
)
from harness.shared import one_upstream_gateway

PRESENT_KEY = "sk-present-server-key-e2e"
CLIENT_KEY = "sk-client-key-missing-e2e"
OAUTH = "Bearer sk-ant-oat01-missing-e2e"

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def write_yaml(folder: Path, routes: list[dict[str, object]]) -> Path:
    config = {
        "listener": {"address": "127.0.0.1", "port": free_port()},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "extproc": {"address": "127.0.0.1", "port": free_port()},
        "routes": routes,
    }
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_serve_without_the_server_key_exits_naming_the_variable_only(
    tmp_path: Path, value: str | None
) -> None:
    routes = [
        credential_route("present", "http://127.0.0.1:9", {"env": "PRESENT_SERVER_KEY_E2E"}),
        credential_route("missing", "http://127.0.0.1:9", {"env": "MISSING_SERVER_KEY_E2E"}),
    ]
    env = {"PRESENT_SERVER_KEY_E2E": PRESENT_KEY}
    if value is not None:
        env["MISSING_SERVER_KEY_E2E"] = value
    done = run_serve(write_yaml(tmp_path, routes), env)
    output = done.stdout + done.stderr
    assert done.returncode == 2
    assert "MISSING_SERVER_KEY_E2E" in output
    assert "PRESENT_SERVER_KEY_E2E" not in output  # only the broken source is reported
    assert PRESENT_KEY not in output


def test_serve_without_the_secret_file_exits_naming_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "no-such-key"
    routes = [credential_route("anthropic", "http://127.0.0.1:9", {"file": str(secret)})]
    done = run_serve(write_yaml(tmp_path, routes), {})
    assert done.returncode == 2
    assert str(secret) in done.stdout + done.stderr


# -- optional: true ------------------------------------------------------------------------


def optional_routes(url: str) -> list[dict[str, object]]:
    """An Anthropic-style and an OpenAI-style route whose secrets are optional and never set."""
    return [
        credential_route("anthropic", url, {"env": "ANTHROPIC_API_KEY", "optional": True}),
        credential_route(
            "openai",
            url,
            {"env": "OPENAI_API_KEY", "optional": True},
            header="authorization",
            format="Bearer {secret}",
            client_credentials=["authorization"],
            error_style="openai",
        ),
    ]


shared, gateway, upstream = one_upstream_gateway("optional", optional_routes)


@pytest.mark.parametrize(
    "headers",
    [[], [("x-api-key", "")], [("authorization", " "), ("x-api-key", "")]],
    ids=["none", "blank-key", "both-blank"],
)
def test_optional_key_missing_gives_an_anthropic_401_and_no_upstream_call(
    gateway: Gateway, upstream: RecordingUpstream, headers: list[tuple[str, str]]
) -> None:
    reply = raw_request(gateway.listener_port, "/anthropic/v1/messages", headers, method="POST")
    assert reply.status == 401
    assert reply.header("content-type") == b"application/json"
    body = reply.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["message"]
    assert upstream.requests == []


def test_optional_key_missing_gives_an_openai_401_on_an_openai_style_route(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    reply = raw_request(gateway.listener_port, "/openai/v1/chat/completions", method="POST")
    assert reply.status == 401
    assert reply.header("content-type") == b"application/json"
    error = reply.json()["error"]
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("prefix", "name", "value"),
    [
        ("/anthropic/", "x-api-key", CLIENT_KEY),
        ("/anthropic/", "authorization", OAUTH),
        ("/openai/", "authorization", "Bearer sk-openai-client"),
    ],
    ids=["anthropic-key", "anthropic-oauth", "openai-bearer"],
)
def test_optional_key_missing_still_forwards_client_credentials(
    gateway: Gateway, upstream: RecordingUpstream, prefix: str, name: str, value: str
) -> None:
    reply = raw_request(gateway.listener_port, prefix + "v1/messages", [(name, value)])
    assert reply.status == 200
    assert upstream.only_request().values(name) == [value.encode()]
