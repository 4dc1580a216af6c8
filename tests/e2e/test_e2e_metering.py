"""Usage counted inside Envoy, proved through real Envoy with API-shaped upstreams.

Each reply here carries distinct counts (input 17, output 19, cache read 13, 5-minute
writes 7, 1-hour writes 11), so a count in the wrong place shows. Every request's JSON
access-log line and the processor's metrics (from the gRPC access-log records) must hold
exactly them, however the body is cut into chunks, whatever the content says, and when
the stream is cut.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest
from harness import Gateway, RecordingUpstream, credential_route, free_port
from harness.adversary import scrape, write_keys
from harness.liveops import metric_sum, poll
from harness.tls import CertFiles, make_certs
from harness.upstream import RecordedRequest, Reply, Responder

ALICE = "gk-alice-metering-key"
OWN = "sk-ant-api03-own-metering"
SERVER = "sk-ant-server-metering"
COUNTS = {"input_tokens": 17, "output_tokens": 19, "cache_read_tokens": 13,
          "cache_5m_tokens": 7, "cache_1h_tokens": 11}  # fmt: skip
MODEL = "claude-sonnet-5-5"
# Text a model may write: it looks like usage, but it is content and is never counted.
LOOKALIKE = 'here is "usage": {"input_tokens": 999, "output_tokens": 999} for you'
FAKE_USAGE = {"input_tokens": 999, "output_tokens": 999, "cache_read_input_tokens": 999}
_SSE = (("content-type", "text/event-stream"),)
_JSON = (("content-type", "application/json"),)

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def _usage(output: int) -> dict[str, Any]:
    return {
        "input_tokens": 17, "output_tokens": output, "cache_read_input_tokens": 13,
        "cache_creation_input_tokens": 18,
        "cache_creation": {"ephemeral_5m_input_tokens": 7, "ephemeral_1h_input_tokens": 11},
    }  # fmt: skip


def anthropic_events() -> list[bytes]:
    """A streamed message whose content (text and a tool's input) looks like usage."""
    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
             "content": [], "stop_reason": None, "usage": _usage(1)}  # fmt: skip
    tool = {"type": "tool_use", "id": "t1", "name": "report", "input": {"usage": FAKE_USAGE}}
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": tool}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": LOOKALIKE}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "input_json_delta",
                                           "partial_json": json.dumps({"usage": FAKE_USAGE})}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 19}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


def anthropic_json() -> bytes:
    content = [
        {"type": "text", "text": LOOKALIKE},
        {"type": "tool_use", "id": "t1", "name": "report", "input": {"usage": FAKE_USAGE}},
    ]
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
               "content": content, "stop_reason": "end_turn", "usage": _usage(19)}  # fmt: skip
    return json.dumps(message).encode()


def openai_body(stream: bool, include_usage: bool) -> list[bytes]:
    usage = {"prompt_tokens": 30, "completion_tokens": 19, "total_tokens": 49,
             "prompt_tokens_details": {"cached_tokens": 13}}  # fmt: skip
    common = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    if not stream:
        choice = {"index": 0, "message": {"role": "assistant", "content": LOOKALIKE}}
        return [json.dumps({**common, "choices": [choice], "usage": usage}).encode()]
    extra = {"usage": None} if include_usage else {}
    chunks = [{**common, "choices": [{"index": 0, "delta": {"content": LOOKALIKE}}], **extra}]
    if include_usage:
        chunks.append({**common, "choices": [], "usage": usage})
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def split(body: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``body`` in pieces at ``cuts``; a short pause between writes so Envoy reads them apart
    (the counts must be exact however it reads them)."""
    start = 0
    for cut in [*cuts, len(body)]:
        if cut > start:
            yield body[start:cut]
            time.sleep(0.001)
        start = cut


class Script:
    """What the upstream sends next: set by each test before its request."""

    def __init__(self) -> None:
        self.reply: Callable[[RecordedRequest], Reply] = lambda _r: Reply(404)

    def __call__(self, request: RecordedRequest) -> Reply:
        return self.reply(request)


class Setup:
    def __init__(self, gateway: Gateway, metrics: int, upstream: RecordingUpstream, script: Script):
        self.gateway, self.metrics, self.upstream, self.script = gateway, metrics, upstream, script

    def page(self) -> str:
        return scrape(self.metrics)

    def post(
        self, path: str, body: dict[str, Any], key: str = ALICE, **headers: str
    ) -> httpx.Response:
        with httpx.Client(base_url=self.gateway.base_url, timeout=10) as client:
            return client.post(path, json=body, headers={"x-api-key": key, **headers})

    def lines(self, route: str = "anthropic") -> list[dict[str, Any]]:
        return [e for e in self.gateway.access_log() if str(e.get("route", "")).startswith(route)]

    def records(self, **labels: str) -> float:
        return metric_sum(self.page(), "gateway_usage_requests_total", **labels)

    def tokens(self, kind: str, **labels: str) -> float:
        return metric_sum(self.page(), "gateway_usage_tokens_total", type=kind, **labels)


@pytest.fixture
def setup(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> Setup:
    script = Script()
    upstream = start_upstream("provider", responder=script)
    write_keys(tmp_path / "keys.txt", {"alice": ALICE})
    metrics = free_port()
    routes = [
        credential_route("anthropic", upstream.url(), prefix="/anthropic"),
        credential_route(
            "openai", upstream.url() + "/v1", prefix="/openai", header="authorization",
            format="Bearer {secret}", client_credentials=["authorization"], error_style="openai",
        ),
    ]  # fmt: skip
    top = {"metering": True, "metering_flush_ms": 50,
           "access": {"keys_file": str(tmp_path / "keys.txt")},
           # a limit of her own gives alice her own series (the client label is bounded)
           "limits": {"clients": {"alice": {"requests_per_minute": 100_000}}},
           "metrics": {"address": "127.0.0.1", "port": metrics}}  # fmt: skip
    env = {"ANTHROPIC_KEY": SERVER, "OPENAI_KEY": SERVER}
    return Setup(start_gateway(routes, env=env, top=top), metrics, upstream, script)


def sends(body: bytes, headers: tuple[tuple[str, str], ...], cuts: list[int]) -> Responder:
    return lambda _request: Reply(200, headers=headers, chunks=split(body, cuts))


def expect_lines(setup: Setup, count: int, **fields: Any) -> list[dict[str, Any]]:
    lines = poll(setup.lines, lambda found: len(found) >= count, "access-log lines")
    assert len(lines) == count
    for line in lines:
        assert {k: line[k] for k in fields} == fields, line
    return lines


MESSAGES = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def usage_event_cuts(events: list[bytes]) -> list[int]:
    """Every byte offset inside the message_start and message_delta events."""
    body = b"".join(events)
    first = len(events[0])
    delta_at = body.index(b"event: message_delta")
    delta_end = delta_at + len(events[-2])
    return [*range(1, first), *range(delta_at + 1, delta_end)]


def test_anthropic_stream_split_at_every_byte_of_its_usage_events(setup: Setup) -> None:
    events = anthropic_events()
    body = b"".join(events)
    cuts = usage_event_cuts(events)
    for cut in cuts:
        setup.script.reply = sends(body, _SSE, [cut])
        reply = setup.post("/anthropic/v1/messages", {**MESSAGES, "stream": True})
        assert reply.content == body
    setup.script.reply = sends(body, _SSE, list(range(1, len(body))))  # every byte apart at once
    assert setup.post("/anthropic/v1/messages", {**MESSAGES, "stream": True}).content == body
    total = len(cuts) + 1
    expect_lines(setup, total, model=MODEL, usage_partial=False, **COUNTS)
    poll(lambda: setup.records(route="anthropic"), lambda n: n == total, "records")
    assert setup.tokens("input", client="alice", model=MODEL) == 17 * total
    assert setup.tokens("output", client="alice") == 19 * total
    assert setup.tokens("cache_read", client="alice") == 13 * total
    assert setup.tokens("cache_creation", client="alice") == 18 * total


def test_anthropic_json_split_anywhere_counts_only_its_top_level_usage(setup: Setup) -> None:
    body = anthropic_json()
    usage_at = body.index(b'"usage": {"input_tokens": 17')
    cuts = [[cut] for cut in range(usage_at - 30, len(body))] + [list(range(1, len(body)))]
    for parts in cuts:
        setup.script.reply = sends(body, _JSON, parts)
        assert setup.post("/anthropic/v1/messages", MESSAGES).content == body
    expect_lines(setup, len(cuts), model=MODEL, usage_partial=None, **COUNTS)
    poll(lambda: setup.records(tokens="known"), lambda n: n == len(cuts), "records")


@pytest.mark.parametrize("stream, include_usage", [(False, False), (True, True), (True, False)])
def test_openai_usage_from_the_body_or_the_final_chunk(
    setup: Setup, stream: bool, include_usage: bool
) -> None:
    body = b"".join(openai_body(stream, include_usage))
    kind = _SSE if stream else _JSON
    for cut in range(1, len(body), 7):
        setup.script.reply = sends(body, kind, [cut])
        reply = setup.post("/openai/chat/completions", {"model": "gpt-4o-mini"}, key="",
                           authorization=f"Bearer {ALICE}")  # fmt: skip
        assert reply.content == body
    sent = len(range(1, len(body), 7))
    if stream and not include_usage:  # nothing reported: unknown, never guessed
        lines = expect_lines_for(setup, "openai", sent)
        assert all(line["input_tokens"] is None and line["output_tokens"] is None for line in lines)
        poll(lambda: setup.records(route="openai", tokens="unknown"), lambda n: n == sent, "rec")
        return
    lines = expect_lines_for(setup, "openai", sent)
    for line in lines:
        counts = (line["input_tokens"], line["cache_read_tokens"], line["output_tokens"])
        assert counts == (17, 13, 19), line
    poll(lambda: setup.records(route="openai", tokens="known"), lambda n: n == sent, "records")
    assert setup.tokens("input", route="openai", model="gpt-4o-mini") == 17 * sent


def expect_lines_for(setup: Setup, route: str, count: int) -> list[dict[str, Any]]:
    lines = poll(lambda: setup.lines(route), lambda found: len(found) >= count, "lines")
    assert len(lines) == count
    return lines


def test_metered_routes_ask_for_identity_and_a_compressed_reply_is_passed_uncounted(
    setup: Setup,
) -> None:
    events = anthropic_events()
    body = b"".join(events)
    setup.script.reply = sends(body, _SSE, [])
    reply = setup.post("/anthropic/v1/messages", {**MESSAGES, "stream": True},
                       **{"accept-encoding": "gzip"})  # fmt: skip
    assert reply.content == body
    assert not setup.upstream.requests[-1].has("accept-encoding")
    packed = gzip.compress(anthropic_json())
    setup.script.reply = lambda _r: Reply(200, packed, (*_JSON, ("content-encoding", "gzip")))
    reply = setup.post("/anthropic/v1/messages", MESSAGES, **{"accept-encoding": "gzip"})
    assert reply.content == anthropic_json()  # httpx decodes: the bytes passed intact
    lines = expect_lines_for(setup, "anthropic", 2)
    assert lines[0]["output_tokens"] == 19 and lines[1]["output_tokens"] is None


def test_a_stream_cut_by_the_upstream_counts_input_and_cache_and_the_output_seen(
    setup: Setup,
) -> None:
    events = anthropic_events()

    def cut_after_start(_request: RecordedRequest) -> Reply:
        def chunks() -> Iterator[bytes]:
            yield events[0]
            yield events[2]
            raise ValueError("the upstream goes away mid-stream")

        return Reply(200, headers=_SSE, chunks=chunks())

    setup.script.reply = cut_after_start
    with pytest.raises(httpx.HTTPError):
        setup.post("/anthropic/v1/messages", {**MESSAGES, "stream": True})
    [line] = expect_lines_for(setup, "anthropic", 1)
    assert line["usage_partial"] is True
    assert (line["input_tokens"], line["cache_read_tokens"], line["output_tokens"]) == (17, 13, 1)
    poll(lambda: metric_sum(setup.page(), "gateway_usage_incomplete_total"), lambda n: n == 1, "")
    assert setup.tokens("output", client="alice") == 1


def test_a_stream_cut_by_the_client_is_counted_as_seen(setup: Setup) -> None:
    events = anthropic_events()

    def slow(_request: RecordedRequest) -> Reply:
        def chunks() -> Iterator[bytes]:
            yield events[0]
            time.sleep(5)  # the client leaves during this pause
            yield from events[1:]

        return Reply(200, headers=_SSE, chunks=chunks())

    setup.script.reply = slow
    with socket.create_connection(("127.0.0.1", setup.gateway.listener_port), timeout=10) as conn:
        body = json.dumps({**MESSAGES, "stream": True}).encode()
        conn.sendall(
            b"POST /anthropic/v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"x-api-key: {ALICE}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        seen = b""
        while b"message_start" not in seen:
            seen += conn.recv(65536)
    [line] = expect_lines_for(setup, "anthropic", 1)
    assert line["usage_partial"] is True and line["output_tokens"] == 1
    assert line["input_tokens"] == 17 and line["cache_1h_tokens"] == 11


def test_the_access_log_service_down_and_back(setup: Setup) -> None:
    """Own-key requests (Envoy's fast path) pass while the processor is away; their records
    are lost (Envoy counts them: logs_written/logs_dropped), their JSON lines keep the
    counts; once the processor is back, records flow again. Nothing crashes."""
    body = b"".join(anthropic_events())
    setup.script.reply = sends(body, _SSE, [])
    setup.gateway.stop_extproc()
    for _ in range(3):
        reply = setup.post("/anthropic/v1/messages", {**MESSAGES, "stream": True}, key=OWN)
        assert reply.status_code == 200 and reply.content == body
    expect_lines(setup, 3, credential_source="client", **COUNTS)
    setup.gateway.start_extproc()
    for _ in range(4):
        assert setup.post("/anthropic/v1/messages", {**MESSAGES, "stream": True}).content == body
    poll(lambda: setup.records(client="alice"), lambda n: n == 4, "records after the restart")
    assert setup.records() <= 7
    assert setup.tokens("output", client="alice") == 4 * 19
    stats = httpx.get(f"http://127.0.0.1:{setup.gateway.admin_port}/stats?filter=grpc_access_log")
    assert "logs_written" in stats.text


class H2Upstream:
    """A TLS upstream that speaks only HTTP/2 (ALPN h2), answering every request with
    ``body`` in the pieces ``cuts`` give: the same meter behind Envoy's HTTP/2 codec."""

    def __init__(self, certs: CertFiles, body: bytes, cuts: list[int]) -> None:
        self.body, self.cuts = body, cuts
        self.context = certs.server_context()
        self.context.set_alpn_protocols(["h2"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.protocols: list[str | None] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                self.protocols.append(conn.selected_alpn_protocol())
                h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
                h2c.initiate_connection()
                conn.sendall(h2c.data_to_send())
                while data := conn.recv(65536):
                    for event in h2c.receive_data(data):
                        if isinstance(event, h2.events.StreamEnded):
                            self._answer(conn, h2c, event.stream_id)
                    conn.sendall(h2c.data_to_send())
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            return

    def _answer(self, conn: ssl.SSLSocket, h2c: h2.connection.H2Connection, stream: int) -> None:
        h2c.send_headers(stream, [(":status", "200"), ("content-type", "text/event-stream")])
        conn.sendall(h2c.data_to_send())
        for piece in split(self.body, self.cuts):
            h2c.send_data(stream, piece)
            conn.sendall(h2c.data_to_send())
        h2c.end_stream(stream)

    def stop(self) -> None:
        self.listener.close()


def test_an_http2_upstream_split_anywhere_is_counted_the_same(
    start_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    events = anthropic_events()
    body = b"".join(events)
    cuts = usage_event_cuts(events)[::5]
    certs = make_certs(tmp_path / "certs", "localhost")
    upstream = H2Upstream(certs, body, cuts)
    try:
        route = credential_route("anthropic", f"https://localhost:{upstream.port}",
                                 prefix="/anthropic", ca_file=str(certs.ca_file))  # fmt: skip
        gateway = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top={"metering": True})
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            for _ in range(3):
                reply = client.post("/anthropic/v1/messages", json={**MESSAGES, "stream": True},
                                    headers={"x-api-key": OWN})  # fmt: skip
                assert reply.content == body
        lines = poll(gateway.access_log, lambda found: len(found) >= 3, "access-log lines")
        assert upstream.protocols and set(upstream.protocols) == {"h2"}
        for line in lines:
            assert {k: line[k] for k in COUNTS} == COUNTS, line
    finally:
        upstream.stop()
