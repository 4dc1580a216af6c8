"""The gRPC face of the processor on grpcio: thin loops around ``calls``.

Answers are pre-serialised bytes, so the methods are registered with generic handlers
that send them as they are. After the request-headers answer the Process stream is
closed: Envoy then stops consulting the processor for that request (every other phase
is SKIP/NONE). StreamAccessLogs takes Envoy's batches of finished requests until Envoy
ends the stream; each stream holds one pool thread (Envoy opens one per worker thread).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.policy.processor import MalformedRequest
from extproc.server.calls import ACCESS_LOG_SERVICE, SERVICE_NAME, Services, decide

_LOGS_RECEIVED: bytes = als_pb2.StreamAccessLogsResponse().SerializeToString()


class ExternalProcessor:
    def __init__(self, services: Services) -> None:
        self._services = services

    def Process(
        self, requests: Iterator[ext_proc.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        for request in requests:
            try:
                answer = decide(self._services, request)
            except MalformedRequest as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            yield answer.payload
            if answer.final:
                return  # nothing more to decide for this request: free the stream

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.Process,
            request_deserializer=ext_proc.ProcessingRequest.FromString,
            response_serializer=None,  # answers are already bytes
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": method})


class AccessLogService:
    """Envoy's usage records, read by the ``Meter`` (messages are parsed there)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._meter = services.meter()

    def StreamAccessLogs(self, messages: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
        for message in messages:
            self._meter.batch(self._services.source.policy, message)
        return _LOGS_RECEIVED

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_unary_rpc_method_handler(
            self.StreamAccessLogs, request_deserializer=None, response_serializer=None
        )
        methods = {"StreamAccessLogs": method}
        return grpc.method_handlers_generic_handler(ACCESS_LOG_SERVICE, methods)
