"""The gRPC face of the processor: a thin stream loop around ``processor.process``.

Answers are pre-serialised bytes, so the method is registered with a generic
handler that sends them as they are. After the request-headers answer the
stream is closed: Envoy then stops consulting the processor for that request
(every other phase is SKIP/NONE), so a long SSE response costs the processor
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.policy.compiled import Policy
from extproc.policy.processor import MalformedRequest, process
from extproc.server.metrics import Metrics

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class PolicySource(Protocol):
    """Anything holding the current policy; reading ``policy`` must be one atomic load."""

    @property
    def policy(self) -> Policy: ...


class ExternalProcessor:
    def __init__(self, source: PolicySource, metrics: Metrics) -> None:
        self._source = source
        self._metrics = metrics

    def Process(
        self, requests: Iterator[ext_proc.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        for request in requests:
            start = time.perf_counter()
            try:
                answer = process(self._source.policy, request)
            except MalformedRequest as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if answer.outcome is not None:
                self._metrics.decided(answer, time.perf_counter() - start)
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
