"""One ExternalProcessor/Process call, whichever server carries it.

Two Envoy filters call the same method: the decision filter (one request-
headers message, one answer) and, on metered routes, the observing filter
(request headers, response headers and body; Envoy waits for no answer).
A call finds out which it is from its first message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.policy.compiled import Policy
from extproc.policy.processor import Answer, process
from extproc.server.metrics import Metrics
from extproc.usage.limiter import Limiter
from extproc.usage.meter import MeterStream

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class PolicySource(Protocol):
    """Anything holding the current policy; reading ``policy`` must be one atomic load."""

    @property
    def policy(self) -> Policy: ...


@dataclass(frozen=True, slots=True)
class Services:
    """What every call shares: the current policy, the metrics, the limits' counters."""

    source: PolicySource
    metrics: Metrics
    limiter: Limiter | None = None


class ProcessCall:
    """Decides on request headers, or follows an observed response until the call ends."""

    __slots__ = ("_meter", "_services", "finished")

    def __init__(self, services: Services) -> None:
        self._services = services
        self._meter: MeterStream | None = None
        self.finished = False  # an observed response has ended: end the call now

    def handle(self, request: ext_proc.ProcessingRequest) -> Answer | None:
        """The answer to send, or None for an observed message (nothing is sent back)."""
        services = self._services
        if request.observability_mode:
            if self._meter is None:
                self._meter = MeterStream(services.metrics, services.limiter)
            self._meter.on_message(services.source.policy, request)
            self.finished = _last(request)
            return None
        start = time.perf_counter()
        answer = process(services.source.policy, request, services.limiter)
        if answer.outcome is not None:
            services.metrics.decided(answer, time.perf_counter() - start)
        return answer

    def end(self) -> None:
        if self._meter is not None:
            self._meter.end()


def _last(request: ext_proc.ProcessingRequest) -> bool:
    """The last message Envoy sends about a response (trailers are never asked for)."""
    phase = request.WhichOneof("request")
    if phase == "response_body":
        return bool(request.response_body.end_of_stream)
    return phase == "response_headers" and bool(request.response_headers.end_of_stream)
