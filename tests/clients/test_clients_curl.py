"""The curl recipes of docs/clients.md, run with the real ``curl`` against the gateway.

Each case is one recipe's headers; the test checks every credential header the
fake provider received and what curl printed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from harness.fakeapi import REPLY_TEXT
from harness.populations import (
    GK,
    MISTYPED_GK,
    OAUTH,
    OWN_ANTHROPIC,
    SERVER_ANTHROPIC,
    SERVER_OPENAI,
    ClientsGateway,
    Expected,
    credentials,
    expected_credentials,
    resolve,
)

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes

ANTHROPIC_BODY = (
    '{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'
)
ANTHROPIC = ("-H", "content-type: application/json", "-H", "anthropic-version: 2023-06-01")
OPENAI_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


@dataclass(frozen=True)
class Recipe:
    path: str  # on the gateway
    arguments: Sequence[str]  # curl's, after the URL (``GK``: the gateway key)
    expected: Expected  # every credential header upstream


CASES = [
    pytest.param(Recipe("/anthropic/v1/messages", ["-H", f"x-api-key: {GK}", *ANTHROPIC, "-d", ANTHROPIC_BODY], {"x-api-key": [SERVER_ANTHROPIC]}), id="gateway key in x-api-key spends the organisation's key"),
    pytest.param(Recipe("/anthropic/v1/messages", ["-H", f"authorization: Bearer {GK}", *ANTHROPIC, "-d", ANTHROPIC_BODY], {"x-api-key": [SERVER_ANTHROPIC]}), id="gateway key as a bearer token spends the organisation's key"),
    pytest.param(Recipe("/anthropic/v1/messages", ["-H", f"x-gateway-key: {GK}", *ANTHROPIC, "-d", ANTHROPIC_BODY], {"x-api-key": [SERVER_ANTHROPIC]}), id="gateway key in x-gateway-key spends the organisation's key"),
    pytest.param(Recipe("/anthropic/v1/messages", ["-H", f"x-api-key: {OWN_ANTHROPIC}", *ANTHROPIC, "-d", ANTHROPIC_BODY], {"x-api-key": [OWN_ANTHROPIC]}), id="own key passes byte for byte"),
    pytest.param(Recipe("/anthropic/v1/messages", ["-H", f"authorization: Bearer {OAUTH}", *ANTHROPIC, "-d", ANTHROPIC_BODY], {"authorization": [f"Bearer {OAUTH}"]}), id="OAuth token passes byte for byte"),
    pytest.param(Recipe("/open/anthropic/v1/messages", [*ANTHROPIC, "-d", ANTHROPIC_BODY], {"x-api-key": [SERVER_ANTHROPIC]}), id="no credential on a route without gateway keys spends the organisation's key"),
    pytest.param(Recipe("/openai/chat/completions", ["-H", f"authorization: Bearer {GK}", "-H", "content-type: application/json", "-d", OPENAI_BODY], {"authorization": [f"Bearer {SERVER_OPENAI}"]}), id="OpenAI route: gateway key as a bearer token spends the organisation's key"),
]  # fmt: skip


@pytest.fixture(scope="module")
def curl() -> str:
    found = shutil.which("curl")
    if found is None:
        pytest.fail("curl is not installed (apt-get install curl)")
    return found


def _curl(curl: str, url: str, arguments: Sequence[str]) -> tuple[int, str]:
    """The HTTP status and body curl got."""
    done = subprocess.run(
        [curl, "-sS", "-w", "\n%{http_code}", url, *arguments],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


@pytest.mark.parametrize("recipe", CASES)
def test_curl(curl: str, clients_gateway: ClientsGateway, recipe: Recipe) -> None:
    key = clients_gateway.gateway_key

    status, body = _curl(curl, clients_gateway.url(recipe.path), resolve(recipe.arguments, key))

    (seen,) = clients_gateway.requests()
    assert credentials(seen) == expected_credentials(recipe.expected, key)
    assert clients_gateway.leaked() == []
    assert status == 200, body
    assert REPLY_TEXT in body


def test_curl_streams_events_as_they_come(curl: str, clients_gateway: ClientsGateway) -> None:
    streamed = ANTHROPIC_BODY.replace("{", '{"stream":true,', 1)
    key = clients_gateway.gateway_key
    arguments = ["-N", "-H", f"x-api-key: {key}", *ANTHROPIC, "-d", streamed]

    status, body = _curl(curl, clients_gateway.url("/anthropic/v1/messages"), arguments)

    assert status == 200, body
    events = [line[len("event: ") :] for line in body.splitlines() if line.startswith("event: ")]
    assert (events[0], events[-1]) == ("message_start", "message_stop")
    seen = clients_gateway.anthropic.only_request()
    assert credentials(seen) == {"x-api-key": [SERVER_ANTHROPIC.encode()]}


def test_curl_mistyped_gateway_key_gets_401_and_reaches_no_upstream(
    curl: str, clients_gateway: ClientsGateway
) -> None:
    arguments = ["-H", f"x-api-key: {MISTYPED_GK}", *ANTHROPIC, "-d", ANTHROPIC_BODY]

    status, body = _curl(curl, clients_gateway.url("/anthropic/v1/messages"), arguments)

    assert status == 401
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert clients_gateway.requests() == []


def test_curl_head_on_the_bare_base_url_reaches_the_provider(
    curl: str, clients_gateway: ClientsGateway
) -> None:
    """``HEAD /anthropic``, the base URL without its slash (Claude Code's first request)."""
    arguments = ["-I", "-H", f"x-api-key: {OWN_ANTHROPIC}"]

    status, _ = _curl(curl, clients_gateway.url("/anthropic"), arguments)

    assert status == 200
    seen = clients_gateway.anthropic.only_request()
    assert (seen.method, seen.path) == ("HEAD", "/")
    assert credentials(seen) == {"x-api-key": [OWN_ANTHROPIC.encode()]}
