"""The processor dies, comes back, or hangs: what clients get, and what the upstream never sees.

With ``failure_mode: closed`` a request that needs the server key is answered
by Envoy itself (503 JSON while the processor is down, 504 JSON when it is too
slow) and never reaches the upstream; requests with their own credential take
Envoy's fast path and do not notice. A restarted processor is used again by
the same Envoy. With ``failure_mode: open`` requests go on unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from harness import Gateway, RecordingUpstream, credential_route, http1
from harness.liveops import Sender, Sent, Traffic, by_number, poll

SERVER_KEY = "sk-ant-api03-failures-server-key"
CLIENT_KEY = "sk-ant-api03-failures-client-key"
OAUTH = "Bearer sk-ant-oat01-failures-client-token"
PATH = "/anthropic/v1/messages"
SENDERS = [
    Sender("none", PATH),
    Sender("none", PATH, http2=True),
    Sender("client-key", PATH, {"x-api-key": CLIENT_KEY}),
    Sender("oauth", PATH, {"authorization": OAUTH}, http2=True),
]
OWN_CREDENTIAL = {"client-key": ("x-api-key", CLIENT_KEY), "oauth": ("authorization", OAUTH)}

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def start(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream, **extproc: object
) -> Gateway:
    route = credential_route("anthropic", upstream.url())
    return start_gateway([route], env={"ANTHROPIC_KEY": SERVER_KEY}, extproc=extproc)


def kill_processor(gateway: Gateway) -> None:
    process = gateway.extproc_process
    assert process is not None
    process.kill()  # SIGKILL: no goodbye to Envoy, no graceful shutdown
    process.wait()


def assert_gateway_json_error(sent: Sent, status: int) -> None:
    assert sent.status == status, sent
    assert sent.content_type == "application/json", sent
    body = json.loads(sent.body)
    assert body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    assert body["error"]["message"]


def test_killed_processor_means_503_json_without_upstream_call_for_credential_less_requests_while_own_credentials_pass_and_a_restart_recovers_without_touching_envoy(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream
) -> None:
    gateway = start(start_gateway, upstream)
    envoy = gateway.envoy_process
    with Traffic(gateway.base_url, SENDERS) as traffic:
        traffic.wait_count(10, "none")
        kill_processor(gateway)
        killed_at = time.monotonic()
        traffic.wait_count(10, "none", status=503, after=killed_at)
        for kind in OWN_CREDENTIAL:
            traffic.wait_count(10, kind, after=killed_at)
        restarting_at = time.monotonic()
        gateway.start_extproc()  # same command, same port
        serving_at = time.monotonic()
        traffic.wait_count(20, "none", after=serving_at)
    sent = traffic.sent()
    assert envoy is gateway.envoy_process and envoy is not None and envoy.poll() is None
    assert not [s for s in sent if s.status is None], traffic.summary()  # no reset, no refusal
    # Own credentials: the fast path never needed the processor.
    assert all(s.status == 200 for s in sent if s.kind in OWN_CREDENTIAL), traffic.summary()
    # Credential-less: 503 JSON while down; recovered once the processor answered again.
    keyless = [s for s in sent if s.kind == "none"]
    assert {s.status for s in keyless} <= {200, 503}, traffic.summary()
    for s in keyless:
        if s.status == 503 or killed_at < s.started < s.ended < restarting_at:
            assert_gateway_json_error(s, 503)
    recovered = min(s.ended for s in keyless if s.status == 200 and s.started > serving_at)
    assert all(s.status == 200 for s in keyless if s.started > recovered), traffic.summary()
    # The upstream: no 503 ever reached it; everything else carried the right credential.
    seen = by_number(upstream)
    for s in sent:
        if s.status == 503:
            assert s.number not in seen, s
        elif s.kind == "none":
            assert seen[s.number].values("x-api-key") == [SERVER_KEY.encode()]
        else:
            name, value = OWN_CREDENTIAL[s.kind]
            assert seen[s.number].values(name) == [value.encode()]
            assert not any(SERVER_KEY.encode() in v for _, v in seen[s.number].headers)


def wait_until_the_key_is_added(client: httpx.Client, upstream: RecordingUpstream) -> None:
    """Send credential-less requests until one reaches the upstream with the server key."""

    def latest() -> tuple[int, list[bytes] | None]:
        status = client.get(PATH).status_code
        requests = upstream.requests
        return status, requests[-1].values("x-api-key") if requests else None

    poll(latest, lambda got: got == (200, [SERVER_KEY.encode()]), "the server key added again")


def test_killed_processor_with_failure_mode_open_forwards_requests_unchanged_until_it_is_back(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream
) -> None:
    gateway = start(start_gateway, upstream, failure_mode="open")
    kill_processor(gateway)
    with http1(gateway.base_url) as client:
        keyless = [client.get(PATH, params={"n": n}) for n in range(3)]
        own = client.get(PATH, params={"n": 3}, headers={"x-api-key": CLIENT_KEY})
    assert [r.status_code for r in [*keyless, own]] == [200] * 4
    seen = by_number(upstream)
    assert [seen[n].values("x-api-key") for n in range(4)] == [[], [], [], [CLIENT_KEY.encode()]]
    gateway.start_extproc()
    with http1(gateway.base_url) as client:
        wait_until_the_key_is_added(client, upstream)


@contextmanager
def stopped(gateway: Gateway) -> Iterator[None]:
    """The processor frozen with SIGSTOP: its port accepts, nothing answers."""
    process = gateway.extproc_process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_processor_slower_than_the_timeout_means_504_json_when_closed_or_unchanged_forwarding_when_open_and_sigcont_restores_it(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream, failure_mode: str
) -> None:
    gateway = start(start_gateway, upstream, failure_mode=failure_mode, timeout_ms=1000)
    with http1(gateway.base_url) as client:
        with stopped(gateway):
            keyless = [client.get(PATH, params={"n": n}) for n in range(2)]
            own = client.get(PATH, params={"n": 2}, headers={"x-api-key": CLIENT_KEY})
        seen = by_number(upstream)
        assert own.status_code == 200
        assert seen[2].values("x-api-key") == [CLIENT_KEY.encode()]
        for n, reply in enumerate(keyless):
            if failure_mode == "closed":
                assert reply.status_code == 504
                assert reply.headers["content-type"] == "application/json"
                assert reply.json()["error"]["type"] == "api_error"
                assert n not in seen
            else:
                assert reply.status_code == 200
                assert seen[n].values("x-api-key") == []
        wait_until_the_key_is_added(client, upstream)
