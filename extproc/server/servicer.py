"""The gRPC face of the processor: a thin stream loop around ``processor.process``.

Answers are pre-serialised bytes, so the method is registered with a generic
handler that sends them as they are. After the request-headers answer the
stream is closed: Envoy then stops consulting the processor for that request
(every other phase is SKIP/NONE), so a long SSE response costs the processor
nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.policy.processor import MalformedRequest
from extproc.server.calls import SERVICE_NAME, ProcessCall, Services


class ExternalProcessor:
    def __init__(self, services: Services) -> None:
        self._services = services

    def Process(
        self, requests: Iterator[ext_proc.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        call = ProcessCall(self._services)
        try:
            for request in requests:
                try:
                    answer = call.handle(request)
                except MalformedRequest as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if answer is None:  # observed: Envoy waits for nothing; end once the response did
                    if call.finished:
                        return
                    continue
                yield answer.payload
                if answer.final:
                    return  # nothing more to decide for this request: free the stream
        finally:
            call.end()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.Process,
            request_deserializer=ext_proc.ProcessingRequest.FromString,
            response_serializer=None,  # answers are already bytes
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": method})
