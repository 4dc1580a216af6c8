"""The per-request path: one ProcessingRequest in, one serialised ProcessingResponse out.

No I/O, no logging, no validation libraries: find the route Envoy matched
(from the ``xds.route_name`` attribute, never from client headers such as
Host), run the decision and hand back answer bytes prebuilt by the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extproc.policy import responses
from extproc.policy.compiled import Policy
from extproc.policy.decision import Outcome, decide
from extproc.policy.limits import Admission, BudgetAdmission, Refusal
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
    teams: tuple[str, ...] = ()  # the gateway key's client's teams (from the keys file)


def process(
    policy: Policy,
    request: ext_proc.ProcessingRequest,
    admission: Admission | None = None,
    budgets: BudgetAdmission | None = None,
    clock: Callable[[], float] = time.time,
) -> Answer:
    """Answer one message of an ext_proc stream; ``admission`` checks the client's limits,
    then ``budgets`` the money budgets it counts for (last: it holds a reservation).

    A gateway key past its expiry is refused first, with one float compare (the
    clock is read only when a valid key was presented)."""
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
    sso = policy.sso  # a person's JWT, verified by Envoy: its payload, never the token
    person = sso.identify(request.metadata_context.filter_metadata) if sso else None
    decision = decide(route.rule, ((h.key, h.raw_value) for h in headers), person)
    outcome, client, teams = decision.outcome, decision.client, decision.teams
    if client and decision.expires <= clock():
        outcome = Outcome.EXPIRED  # a 401 for this client: no limit or budget applies
    if outcome in _SPENDS:
        refusal = _admit(policy, client, teams, admission, budgets)
        if refusal is not None:
            limited = route.limited(refusal, client, teams)
            return Answer(limited, route.name, Outcome.LIMITED, client, teams=teams)
    payload = route.answer(outcome, decision.remove, client, teams)
    return Answer(payload, route.name, outcome, client, teams=teams)


def _admit(
    policy: Policy,
    client: str,
    teams: tuple[str, ...],
    admission: Admission | None,
    budgets: BudgetAdmission | None,
) -> Refusal | None:
    """The client's limits, then its budgets, as one step of the limiter when it has
    limits: a request the budgets refuse uses up none of them."""
    limits = policy.limits
    if admission is not None and client and limits is not None:
        limit = limits.for_client(client)
        if limit.any:
            return admission.admit(client, limit, limits.on_store_error, budgets, teams)
    return budgets.admit(client, teams) if budgets is not None else None
