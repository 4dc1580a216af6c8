"""The credential decision: a pure function of one route's policy and the request headers.

Nothing here knows about gRPC or protobuf, so the whole rule set is tested as
a table. The rule: if the client sent any of the route's client credential
headers with a non-blank value, change nothing; otherwise inject the server's
credential and drop the blank credential headers the client sent, so the
upstream never sees an empty credential beside the injected one; if the server
has no credential for this route, reject.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    """What happened to a request; the values are the metric/access-log labels."""

    CLIENT_AUTHORIZATION = "client_authorization"
    CLIENT_API_KEY = "client_api_key"
    INJECTED = "injected"
    REJECTED = "rejected"

    @property
    def credential_source(self) -> str:
        """Who pays: ``client``, ``injected`` or ``none`` (for the access log)."""
        if self is Outcome.INJECTED:
            return "injected"
        return "none" if self is Outcome.REJECTED else "client"


@dataclass(frozen=True, slots=True)
class RouteRule:
    """The part of a route's policy the decision needs."""

    header: str  # the header the server credential goes into
    client_credentials: frozenset[str]  # lower-case names; a non-blank one means "client pays"
    has_secret: (
        bool  # False: an optional secret is missing, so credential-less requests are rejected
    )


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    remove: tuple[str, ...] = ()  # blank client credential headers to drop when injecting


_CLIENT_AUTHORIZATION = Decision(Outcome.CLIENT_AUTHORIZATION)
_CLIENT_API_KEY = Decision(Outcome.CLIENT_API_KEY)
_INJECTED = Decision(Outcome.INJECTED)
_REJECTED = Decision(Outcome.REJECTED)


def decide(rule: RouteRule, headers: Iterable[tuple[str, bytes]]) -> Decision:
    """Decide for one request; ``headers`` are (name, raw value) pairs as Envoy sent them.

    Names are compared case-insensitively; values are bytes, so non-UTF-8
    bytes anywhere never matter. Repeated headers count as present-and-filled
    if any copy is filled.
    """
    wanted = rule.client_credentials
    blank: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower not in wanted:
            continue
        if value.strip():
            return _CLIENT_AUTHORIZATION if lower == "authorization" else _CLIENT_API_KEY
        if lower != rule.header and lower not in blank:
            blank.append(lower)
    if not rule.has_secret:
        return _REJECTED
    return Decision(Outcome.INJECTED, tuple(sorted(blank))) if blank else _INJECTED
