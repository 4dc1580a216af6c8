"""The lean processor server against real HTTP/2 peers: grpcio's client and the h2 library.

grpcio proves gRPC interoperability (status codes, trailers, streams ending);
h2 lets a test drive what Envoy rarely does: tiny flow-control windows,
CONTINUATION frames, padding, PING and GOAWAY.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import load_config
from extproc.h2server import GrpcServer
from extproc.h2wire import HeaderDecoder
from extproc.lean_backend import HEALTH_CHECK_PATH, PROCESS_PATH, Health, process_method
from extproc.metrics import Metrics
from extproc.policy import Policy, compile_policy
from extproc.processor import ATTRIBUTES_KEY, ROUTE_ATTRIBUTE

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - name: paid
    prefix: /paid/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: KEY}}
"""


@dataclass
class FixedPolicy:
    policy: Policy


@dataclass
class Running:
    port: int
    route: str  # the Envoy route name the policy knows
    server: GrpcServer
    loop: asyncio.AbstractEventLoop
    health: Health


@pytest.fixture
def lean(tmp_path: Path) -> Iterator[Running]:
    (tmp_path / "gateway.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "gateway.yaml")
    source = FixedPolicy(compile_policy(config, {"KEY": "server-key"}))
    health = Health()
    health.set("", True)
    methods = {PROCESS_PATH: process_method(source, Metrics()), HEALTH_CHECK_PATH: health.check}
    server = GrpcServer(methods)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0, False), loop).result(5)
    port = server.port
    yield Running(port, config.routes[0].envoy_name, server, loop, health)
    asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def headers_request(route: str, **headers: bytes) -> pb.ProcessingRequest:
    attributes = struct_pb2.Struct()
    attributes.update({ROUTE_ATTRIBUTE: route})
    values = [
        base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v) for k, v in headers.items()
    ]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values)),
        attributes={ATTRIBUTES_KEY: attributes},
    )


def test_grpcio_client_gets_the_key_and_the_call_ends_ok(lean: Running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{lean.port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process(iter([headers_request(lean.route)]))
        answers = list(call)
        assert call.code() is grpc.StatusCode.OK
    [answer] = answers
    [header] = answer.request_headers.response.header_mutation.set_headers
    assert (header.header.key, header.header.raw_value) == ("x-api-key", b"server-key")


def test_grpcio_client_many_calls_share_one_connection(lean: Running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{lean.port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        for _ in range(200):
            answers = list(
                stub.Process(iter([headers_request(lean.route, authorization=b"Bearer t")]))
            )
            assert len(answers) == 1 and not answers[0].request_headers.HasField("response")


def test_other_phases_are_answered_and_keep_the_call_open(lean: Running) -> None:
    requests = [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
        headers_request(lean.route),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{lean.port}") as channel:
        answers = list(pb_grpc.ExternalProcessorStub(channel).Process(iter(requests)))
    assert [a.WhichOneof("response") for a in answers] == ["response_headers", "request_headers"]


def test_a_message_with_no_phase_is_invalid_argument(lean: Running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{lean.port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process(iter([pb.ProcessingRequest()]))
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_bytes_that_are_not_a_message_are_invalid_argument(lean: Running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{lean.port}") as channel:
        method = channel.stream_stream(
            PROCESS_PATH.decode(), request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(method(iter([b"\xff\xff\xff"])))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_an_unknown_method_is_unimplemented(lean: Running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{lean.port}") as channel:
        method = channel.unary_unary(
            "/some.Service/Nope", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            method(b"")
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_health_check_answers_by_service_name(lean: Running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{lean.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service="")).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        lean.health.set("", False)
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service="")).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


# -- the h2 library as the peer ----------------------------------------------------------------


class H2Peer:
    """A blocking HTTP/2 client on a socket, driven frame by frame by the test."""

    def __init__(self, port: int, initial_window: int = 65535) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def open_call(self, stream: int, path: bytes = PROCESS_PATH, extra: int = 0) -> None:
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"extproc"),
                   (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"x-big", b"x" * extra)]  # fmt: skip
        self.conn.send_headers(stream, headers)
        self.flush()

    def events_until(self, done: type, stream: int) -> list[h2.events.Event]:
        seen: list[h2.events.Event] = []
        while not any(
            isinstance(e, done) and getattr(e, "stream_id", stream) == stream for e in seen
        ):
            data = self.sock.recv(65535)
            assert data, "server closed the connection"
            seen += self.conn.receive_data(data)
            self.flush()
        return seen

    def close(self) -> None:
        self.sock.close()


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def received(events: list[h2.events.Event], stream: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == stream
    )


def test_a_tiny_window_splits_the_answer_until_the_peer_opens_it(lean: Running) -> None:
    peer = H2Peer(lean.port, initial_window=10)
    peer.open_call(1)
    peer.conn.send_data(1, grpc_frame(headers_request(lean.route).SerializeToString()))
    peer.flush()
    first = peer.events_until(h2.events.DataReceived, 1)
    assert len(received(first, 1)) == 10  # exactly the window, then the server waits
    peer.conn.increment_flow_control_window(100_000, stream_id=1)
    peer.conn.increment_flow_control_window(100_000)
    peer.flush()
    rest = peer.events_until(h2.events.StreamEnded, 1)
    body = received(first, 1) + received(rest, 1)
    answer = pb.ProcessingResponse.FromString(body[5:])
    assert (
        answer.request_headers.response.header_mutation.set_headers[0].header.raw_value
        == b"server-key"
    )
    trailers = next(e for e in rest if isinstance(e, h2.events.TrailersReceived))
    assert (b"grpc-status", b"0") in trailers.headers
    peer.close()


def test_continuation_frames_padding_and_a_message_split_across_data_frames(lean: Running) -> None:
    peer = H2Peer(lean.port)
    peer.open_call(1, extra=20_000)  # more than one frame: HEADERS + CONTINUATION
    message = grpc_frame(headers_request(lean.route).SerializeToString())
    peer.conn.send_data(1, message[:3], pad_length=7)
    peer.flush()
    peer.conn.send_data(1, message[3:], pad_length=1)
    peer.flush()
    events = peer.events_until(h2.events.StreamEnded, 1)
    assert pb.ProcessingResponse.FromString(received(events, 1)[5:]).HasField("request_headers")
    peer.close()


def test_ping_is_acknowledged(lean: Running) -> None:
    peer = H2Peer(lean.port)
    peer.conn.ping(b"12345678")
    peer.flush()
    events: list[h2.events.Event] = []
    while not any(isinstance(e, h2.events.PingAckReceived) for e in events):
        events += peer.conn.receive_data(peer.sock.recv(65535))
    assert (
        next(e for e in events if isinstance(e, h2.events.PingAckReceived)).ping_data == b"12345678"
    )
    peer.close()


def test_stop_sends_goaway_and_closes_idle_connections(lean: Running) -> None:
    peer = H2Peer(lean.port)
    peer.open_call(1)
    peer.conn.send_data(1, grpc_frame(headers_request(lean.route).SerializeToString()))
    peer.flush()
    peer.events_until(h2.events.StreamEnded, 1)
    asyncio.run_coroutine_threadsafe(lean.server.stop(1.0), lean.loop).result(5)
    events: list[h2.events.Event] = []
    while data := peer.sock.recv(65535):
        events += peer.conn.receive_data(data)
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
    peer.close()


def test_header_decoder_agrees_with_hpack_on_every_kind_of_field() -> None:
    """Indexed, literal (with, without, never indexing), table resizes: the same :path as hpack."""
    encoder, reference, decoder = hpack.Encoder(), hpack.Decoder(), HeaderDecoder()
    rng = random.Random(7)
    envoy_block = bytes.fromhex(
        "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d8721508"
    )
    assert HeaderDecoder().path(envoy_block) == PROCESS_PATH  # what Envoy 1.40 sends every time
    for i in range(500):
        path = rng.choice(["/a", PROCESS_PATH.decode(), f"/n/{i}"])
        tuples = {
            "plain": (":path", path),
            "never": hpack.NeverIndexedHeaderTuple(":path", path),
        }
        fields = [
            (":method", "POST"),
            tuples[rng.choice(["plain", "never"])],
            ("x-n", str(rng.randint(0, 9))),
        ]
        if rng.random() < 0.05:
            encoder.header_table_size = rng.choice([0, 256, 4096])
        block = encoder.encode(fields, huffman=rng.random() < 0.7)
        expected = dict(reference.decode(block, raw=True))[b":path"]
        assert decoder.path(block) == expected
