"""AccessLogService/StreamAccessLogs on both servers, with grpcio's generated client.

Envoy keeps the stream open and sends a batch per flush; each batch is read at once
(the records reach the metrics before the stream ends), and the one empty answer comes
when the client ends its side. A batch that is not a message is counted, and the stream
goes on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2
from harness.liveops import poll
from harness.messages import two_route_policy

from extproc.config.model import METADATA_NAMESPACE
from extproc.server import grpcio_backend
from extproc.server.calls import Services
from extproc.server.h2server import GrpcServer
from extproc.server.lean_backend import ACCESS_LOG_PATH, access_log_opener
from extproc.server.metrics import Metrics
from extproc.usage.records import USAGE_NAMESPACE


def lean(services: Services) -> Iterator[int]:
    server = GrpcServer({}, openers={ACCESS_LOG_PATH: access_log_opener(services)})
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0, False), loop).result(5)
    yield server.port
    asyncio.run_coroutine_threadsafe(server.stop(0.1), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)


def reference(services: Services) -> Iterator[int]:
    server = grpcio_backend.build_server(
        services, grpcio_backend.GrpcioHealth(), threads=4, reuse_port=False
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0.1).wait()


def batch(route: str, outputs: list[int]) -> bytes:
    message = als_pb2.StreamAccessLogsMessage()
    for output in outputs:
        entry = message.http_logs.log_entry.add()
        entry.common_properties.route_name = route
        metadata = entry.common_properties.metadata.filter_metadata
        metadata[METADATA_NAMESPACE].update({"credential_source": "injected", "client": "alice"})
        metadata[USAGE_NAMESPACE].update({"model": "m", "input": 1, "output": output})
        entry.response.response_code.value = 200
    return message.SerializeToString()


def tokens(metrics: Metrics, kind: str) -> float:
    return sum(
        s.value
        for family in metrics.usage_tokens.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.labels["type"] == kind
    )


def unreadable(metrics: Metrics) -> float:
    value: float = metrics.usage_unreadable.collect()[0].samples[0].value
    return value


@pytest.mark.parametrize("serve", [lean, reference], ids=["lean", "grpcio"])
def test_batches_are_read_as_they_come_and_the_stream_ends_with_one_empty_answer(
    tmp_path: Path, serve: Callable[[Services], Iterator[int]]
) -> None:
    source, names = two_route_policy(tmp_path)
    metrics = Metrics()
    servers = serve(Services(source, metrics))
    port = next(servers)
    sent: list[bytes] = [batch(names["paid"], [5, 7]), b"\xff\xfe not a batch"]
    more = threading.Event()

    def messages() -> Iterator[bytes]:
        yield from sent
        more.wait(10)  # the stream stays open, as Envoy's does
        yield batch(names["paid"], [11])

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(
                ACCESS_LOG_PATH.decode(), request_serializer=None, response_deserializer=None
            )
            future = call.future(messages())
            poll(lambda: tokens(metrics, "output"), lambda n: n == 12, "first batch read")
            poll(lambda: unreadable(metrics), lambda n: n == 1, "the bad batch counted")
            more.set()
            assert future.result(timeout=10) == b""  # StreamAccessLogsResponse, empty
        assert tokens(metrics, "output") == 23 and tokens(metrics, "input") == 3
    finally:
        more.set()
        next(servers, None)


def test_an_entry_for_a_route_the_policy_does_not_know_is_skipped(tmp_path: Path) -> None:
    source, _names = two_route_policy(tmp_path)
    metrics = Metrics()
    Services(source, metrics).meter().batch(source.policy, batch("not_found", [5]))
    assert tokens(metrics, "output") == 0
