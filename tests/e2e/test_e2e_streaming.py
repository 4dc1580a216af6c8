"""SSE through the gateway: events reach the client as the upstream sends them.

The upstream sends the first event and then holds the stream open until the
test lets it go on. The client reading that first event while the upstream is
still holding proves nothing between them buffers the response; no clock is
involved. A buffering gateway fails the test: the client sees nothing until
the upstream gives up holding, by which time the client has timed out.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from harness import (
    Gateway,
    RecordingUpstream,
    credential_route,
    http1,
    http2,
    sse_event,
    sse_events,
)
from harness.shared import one_upstream_gateway

SERVER_KEY = "sk-ant-api03-server-key-sse"
OAUTH = "Bearer sk-ant-oat01-sse-client"
CLIENT_KEY = "sk-ant-api03-sse-client"
EVENTS = 3

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


shared, gateway, upstream = one_upstream_gateway(
    "sse", lambda url: [credential_route("anthropic", url)], env={"ANTHROPIC_KEY": SERVER_KEY}
)


# (client headers, the credential header to look at upstream, the value it must have there)
CASES = {
    "injected": ({}, "x-api-key", SERVER_KEY),
    "client-key": ({"x-api-key": CLIENT_KEY}, "x-api-key", CLIENT_KEY),
    "oauth": ({"authorization": OAUTH}, "authorization", OAUTH),
}


@pytest.mark.parametrize("client_factory", [http1, http2], ids=["http1", "http2"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_first_event_reaches_the_client_while_the_upstream_is_still_streaming(
    gateway: Gateway,
    upstream: RecordingUpstream,
    client_factory: Callable[[str], httpx.Client],
    case: tuple[dict[str, str], str, str],
) -> None:
    credential, header, expected = case
    target = f"/anthropic/sse?hold=1&events={EVENTS}&pause_ms=50"
    with (
        client_factory(gateway.base_url) as client,
        client.stream("POST", target, json={"stream": True}, headers=credential) as reply,
    ):
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "text/event-stream"
        events = sse_events(reply.iter_raw())
        assert next(events) == sse_event(1)
        assert not upstream.sse_finished.is_set()  # the upstream is holding after event 1
        upstream.sse_release.set()
        rest = list(events)
    assert rest == [sse_event(n) for n in range(2, EVENTS + 1)]
    assert upstream.sse_finished.is_set()
    assert upstream.only_request().values(header) == [expected.encode()]
