"""The processor's two gRPC methods, whichever server carries them.

``ExternalProcessor/Process``: the decision filter sends one request-headers message and
gets one answer. ``AccessLogService/StreamAccessLogs``: Envoy streams batches of finished
requests (with the tokens its Lua meter counted); nothing is answered until Envoy ends the
stream. Neither ever holds a byte of a response.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.policy.compiled import Policy
from extproc.policy.limits import BudgetAdmission
from extproc.policy.processor import Answer, process
from extproc.server.metrics import Metrics
from extproc.usage import meter
from extproc.usage.limiter import Limiter
from extproc.usage.records import RecordSink

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
ACCESS_LOG_SERVICE = "envoy.service.accesslog.v3.AccessLogService"


class PolicySource(Protocol):
    """Anything holding the current policy; reading ``policy`` must be one atomic load."""

    @property
    def policy(self) -> Policy: ...


@dataclass(frozen=True, slots=True)
class Services:
    """What every call shares: the current policy, the metrics, the limits' counters, and
    the sinks that take each batch of usage records (the spend ledger)."""

    source: PolicySource
    metrics: Metrics
    limiter: Limiter | None = None
    sinks: tuple[RecordSink, ...] = ()
    budgets: BudgetAdmission | None = None  # spend's budgets in USD (checked after the limits)

    def meter(self) -> meter.Meter:
        return meter.Meter(self.metrics, self.limiter, self.sinks)


def decide(services: Services, request: ext_proc.ProcessingRequest) -> Answer:
    """Answer one Process message (a request admitted on our key is counted by the limiter)."""
    start = time.perf_counter()
    policy = services.source.policy
    answer = process(policy, request, services.limiter, services.budgets)
    if answer.outcome is not None:
        services.metrics.decided(answer, time.perf_counter() - start, policy.limits)
    return answer
