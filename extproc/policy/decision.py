"""The credential decision: a pure function of one route's rule and the request headers.

Nothing here knows about gRPC or protobuf, so the whole rule set is tested as
a table. The rule:

1. If the route has gateway keys, a request that would spend the server's
   credential must present a valid one (and so must every request when the
   route demands keys for client credentials too); otherwise it is DENIED.
2. If the client sent any of the route's client credential headers with a
   non-blank value, nothing changes: the client pays.
3. Otherwise the server credential is injected and blank credential headers
   the client sent are dropped, so the upstream never sees an empty credential
   beside the injected one; if the server has no credential, REJECTED.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from extproc.policy.access import GatewayKeys


class Outcome(Enum):
    """What happened to a request; the values are the metric/access-log labels."""

    CLIENT_AUTHORIZATION = "client_authorization"
    CLIENT_API_KEY = "client_api_key"
    INJECTED = "injected"
    REJECTED = "rejected"  # no client credential and no server credential configured
    DENIED = "denied"  # gateway key missing or invalid
    UNKNOWN_ROUTE = "unknown_route"  # Envoy named a route the processor does not know: 503

    @property
    def credential_source(self) -> str:
        """Who pays: ``client``, ``injected`` or ``none`` (for the access log)."""
        if self is Outcome.INJECTED:
            return "injected"
        return "client" if self.value.startswith("client") else "none"


# An Authorization value that is only a scheme ("Bearer " from an empty token variable)
# carries no credential: it counts as blank.
_BARE_SCHEMES = frozenset({b"bearer", b"basic"})


def is_blank(name: str, value: bytes) -> bool:
    """True for a credential header that carries nothing usable."""
    stripped = value.strip()
    return not stripped or (name == "authorization" and stripped.lower() in _BARE_SCHEMES)


@dataclass(frozen=True, slots=True)
class RouteRule:
    """The part of a route's policy the decision needs."""

    header: str  # the header the server credential goes into
    client_credentials: frozenset[str]  # lower-case names; a non-blank one means "client pays"
    has_secret: (
        bool  # False: an optional secret is missing, so credential-less requests are rejected
    )
    keys: GatewayKeys | None = None


class Decision(NamedTuple):  # a tuple: cheap to build once per request
    outcome: Outcome
    remove: tuple[str, ...] = ()  # blank client credential headers to drop when injecting
    client: str = ""  # the gateway key's client name, when one was presented and valid


def decide(rule: RouteRule, headers: Iterable[tuple[str, bytes]]) -> Decision:
    """Decide for one request; ``headers`` are (name, raw value) pairs as Envoy sent them.

    Names are compared case-insensitively; values are bytes, so non-UTF-8
    bytes anywhere never matter. Repeated credential headers count as filled if
    any copy is filled; a repeated gateway key header is never valid.
    """
    wanted = rule.client_credentials
    key_header = rule.keys.header if rule.keys else None
    paying: Outcome | None = None
    blank: list[str] = []
    presented: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower == key_header:
            presented.append(value)
        elif lower in wanted:
            if not is_blank(lower, value):
                if paying is None:
                    paying = (
                        Outcome.CLIENT_AUTHORIZATION
                        if lower == "authorization"
                        else Outcome.CLIENT_API_KEY
                    )
            elif lower != rule.header and lower not in blank:
                blank.append(lower)
    client = ""
    if rule.keys is not None and (paying is None or rule.keys.for_client_credentials):
        found = rule.keys.identify(presented[0] if len(presented) == 1 else None)
        if found is None:
            return Decision(Outcome.DENIED)
        client = found
    if paying is not None:
        return Decision(paying, client=client)
    if not rule.has_secret:
        return Decision(Outcome.REJECTED, client=client)
    return Decision(Outcome.INJECTED, tuple(sorted(blank)), client)
