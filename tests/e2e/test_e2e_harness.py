"""The test harness itself: the recording upstream must record exactly what it was sent.

Every end-to-end assertion about bytes reaching the provider rests on the
recorder, so it is checked here directly, without the gateway in between.
"""

from __future__ import annotations

import itertools
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import harness.gateway
import httpx
import pytest
from harness import (
    Gateway,
    RecordingUpstream,
    Reply,
    credential_route,
    free_port,
    http1,
    make_certs,
    raw_request,
    sse_event,
    sse_events,
)


def test_upstream_records_names_values_duplicates_and_order_as_sent(
    upstream: RecordingUpstream,
) -> None:
    headers = [("X-Odd-Case", b"caf\xe9"), ("x-api-key", b""), ("x-api-key", b"k2"),
               ("Authorization", b"Bearer a")]  # fmt: skip
    reply = raw_request(upstream.port, "/v1/x?y=1", headers, method="POST", body=b"{}")
    assert reply.status == 200
    seen = upstream.only_request()
    assert (seen.method, seen.target, seen.path, seen.body) == ("POST", "/v1/x?y=1", "/v1/x", b"{}")
    assert list(seen.headers[1 : 1 + len(headers)]) == headers  # after Host, before the framing
    assert seen.values("X-API-KEY") == [b"", b"k2"]


def test_upstream_answers_redirects_and_chosen_statuses(upstream: RecordingUpstream) -> None:
    redirect = raw_request(
        upstream.port, "/redirect?status=307&location=https://elsewhere.example/"
    )
    assert redirect.status == 307
    assert redirect.header("location") == b"https://elsewhere.example/"
    assert raw_request(upstream.port, "/status/429").status == 429
    assert len(upstream.requests) == 2


def test_upstream_responder_overrides_the_built_in_paths(
    start_upstream: Callable[..., RecordingUpstream],
) -> None:
    custom = start_upstream("custom", responder=lambda request: Reply(418, b"teapot"))
    reply = raw_request(custom.port, "/sse")
    assert (reply.status, reply.body) == (418, b"teapot")


def test_held_sse_stream_sends_one_event_then_waits_for_the_test(
    upstream: RecordingUpstream,
) -> None:
    url = f"http://127.0.0.1:{upstream.port}/sse?hold=1&events=2&pause_ms=0"
    with httpx.stream("GET", url, timeout=15) as reply:
        events = sse_events(reply.iter_raw())
        assert next(events) == sse_event(1)
        assert not upstream.sse_finished.is_set()
        upstream.sse_release.set()
        assert list(events) == [sse_event(2)]
    assert upstream.sse_finished.is_set()


def test_tls_upstream_counts_handshakes_from_clients_that_distrust_it(
    tmp_path: Path, start_upstream: Callable[..., RecordingUpstream]
) -> None:
    certs = make_certs(tmp_path / "certs", "localhost")
    other = make_certs(tmp_path / "other", "localhost")
    upstream = start_upstream("tls", tls=certs.server_context())
    good = raw_request(upstream.port, "/ok", host="localhost", tls=certs.client_context())
    assert good.status == 200
    with pytest.raises((ssl.SSLError, socket.error)):
        raw_request(upstream.port, "/never", host="localhost", tls=other.client_context())
    assert [request.path for request in upstream.requests] == ["/ok"]
    assert upstream.wait_handshake_failures(1) == 1


def test_gateway_start_picks_new_ports_when_one_is_taken(
    tmp_path: Path, upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = itertools.chain([taken], iter(free_port, None))
        monkeypatch.setattr(harness.gateway, "free_port", lambda: next(picks))
        route = credential_route("anthropic", upstream.url())
        with Gateway(tmp_path / "gateway", [route], env={"ANTHROPIC_KEY": "k"}) as gateway:
            assert gateway.listener_port != taken
            with http1(gateway.base_url) as client:
                assert client.get("/anthropic/v1/models").status_code == 200
    assert "already in use" in gateway.logs()  # the first Envoy did meet the taken port
