"""The per-request path: one ProcessingRequest in, one serialised ProcessingResponse out.

No I/O, no logging, no validation libraries: find the route Envoy matched
(from the ``xds.route_name`` attribute, never from client headers such as
Host), run the decision and hand back answer bytes prebuilt by the policy.
"""

from __future__ import annotations

from typing import NamedTuple

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.policy import responses
from extproc.policy.compiled import Policy
from extproc.policy.decision import Outcome, decide
from extproc.policy.limits import Admission
from extproc.policy.responses import PHASE_REPLIES

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
ROUTE_ATTRIBUTE = "xds.route_name"
_SPENDS = frozenset({Outcome.INJECTED, Outcome.REPLACED})  # the organisation's key pays
_UNKNOWN_ROUTE = responses.unknown_route()
_NO_ROUTE = ext_proc.ProcessingResponse(
    request_headers=ext_proc.HeadersResponse()
).SerializeToString()


class MalformedRequest(ValueError):
    """A ProcessingRequest with no phase set; answered with a gRPC error, never silently."""


class Answer(NamedTuple):
    payload: bytes
    route: str  # the YAML route name (for an unknown route: the name Envoy sent)
    outcome: Outcome | None  # None: nothing decided (another phase, or no route matched)
    client: str = ""  # the gateway key's client name
    final: bool = True  # nothing more to decide on this stream: end it


def process(
    policy: Policy, request: ext_proc.ProcessingRequest, admission: Admission | None = None
) -> Answer:
    """Answer one message of an ext_proc stream; ``admission`` checks the client's limits."""
    phase = request.WhichOneof("request")
    if phase != "request_headers":
        if phase is None:
            raise MalformedRequest("ProcessingRequest has no phase set")
        return Answer(PHASE_REPLIES[phase], "", None, final=False)
    route_name = request.attributes[ATTRIBUTES_KEY].fields[ROUTE_ATTRIBUTE].string_value
    route = policy.routes.get(route_name)
    if route is None:
        if not route_name:  # no route matched (e.g. CONNECT): Envoy's router answers 404
            return Answer(_NO_ROUTE, "", None)
        return Answer(_UNKNOWN_ROUTE, route_name, Outcome.UNKNOWN_ROUTE)
    headers = request.request_headers.headers.headers
    decision = decide(route.rule, ((h.key, h.raw_value) for h in headers))
    outcome, client = decision.outcome, decision.client
    if admission is not None and client and outcome in _SPENDS and policy.limits is not None:
        limit = policy.limits.for_client(client)
        if limit.any:
            refusal = admission.admit(client, limit, policy.limits.on_store_error)
            if refusal is not None:
                return Answer(route.limited(refusal, client), route.name, Outcome.LIMITED, client)
    payload = route.answer(outcome, decision.remove, client)
    return Answer(payload, route.name, outcome, client)
