"""The gateway-key promise while the processor is dead: no ``gk-`` value ever reaches a provider.

``failure_mode: open`` is refused wherever gateway keys exist (a unit test proves that), so a
gateway with keys runs ``closed``: with the processor killed under mixed load (gateway keys in
every slot, over HTTP/1.1 and HTTP/2, mistyped keys, clients' own credentials), a request with
a gateway key is answered 503 by Envoy and never forwarded, and the upstream sees no ``gk-``
value before, during or after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Gateway, GatewayStartError, RecordingUpstream, credential_route
from harness.keys import key_line
from harness.liveops import Sender, Traffic, by_number

SERVER_KEY = "sk-ant-api03-keys-down-server-key"
CLIENT_KEY = "sk-ant-api03-keys-down-client-key"
GATEWAY_KEY = "gk-alice-processor-down-0123456789abcdef0123456789"
PATH = "/anthropic/v1/messages"
GATEWAY_KEY_SENDERS = [
    Sender("gk-x-api-key", PATH, {"x-api-key": GATEWAY_KEY}),
    Sender("gk-bearer", PATH, {"authorization": f"Bearer {GATEWAY_KEY}"}, http2=True),
    Sender("gk-header", PATH, {"x-gateway-key": GATEWAY_KEY}),
    Sender("gk-mistyped", PATH, {"x-api-key": "gk-not-a-key-of-anyone"}, http2=True),
]
SENDERS = [*GATEWAY_KEY_SENDERS, Sender("client-key", PATH, {"x-api-key": CLIENT_KEY})]

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def test_no_gateway_key_reaches_the_upstream_while_the_processor_is_dead(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(key_line("alice", GATEWAY_KEY) + "\n")
    gateway = start_gateway(
        [credential_route("anthropic", upstream.url())],
        env={"ANTHROPIC_KEY": SERVER_KEY},
        top={"access": {"keys_file": str(keys)}},
    )
    with Traffic(gateway.base_url, SENDERS) as traffic:
        traffic.wait_count(5, "gk-x-api-key", status=200)
        process = gateway.extproc_process
        assert process is not None
        process.kill()  # SIGKILL: no goodbye to Envoy
        process.wait()
        killed_at = time.monotonic()
        for sender in GATEWAY_KEY_SENDERS:
            traffic.wait_count(5, sender.kind, status=503, after=killed_at)
        traffic.wait_count(5, "client-key", status=200, after=killed_at)
        gateway.start_extproc()
        traffic.wait_count(5, "gk-bearer", status=200, after=time.monotonic())
    sent = traffic.sent()
    seen = by_number(upstream)
    for request in upstream.requests:  # the promise, over everything the upstream received
        assert not any(b"gk-" in value for _, value in request.headers), request
    for s in sent:
        if s.kind.startswith("gk-") and killed_at < s.started and s.status == 503:
            assert s.number not in seen, s  # answered by Envoy, never forwarded
        if s.kind == "gk-mistyped":
            assert s.status in (401, 503) and s.number not in seen, s
        elif s.status == 200 and s.kind.startswith("gk-"):
            assert seen[s.number].values("x-api-key") == [SERVER_KEY.encode()]


def test_a_gateway_with_keys_and_failure_mode_open_refuses_to_start(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(key_line("alice", GATEWAY_KEY) + "\n")
    with pytest.raises(GatewayStartError) as caught:
        start_gateway(
            [credential_route("anthropic", upstream.url())],
            env={"ANTHROPIC_KEY": SERVER_KEY},
            extproc={"failure_mode": "open"},
            top={"access": {"keys_file": str(keys)}},
        )
    assert "extproc.failure_mode: open cannot be used with gateway keys" in str(caught.value)
    assert upstream.requests == []
