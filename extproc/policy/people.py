"""People from the organisation's SSO: who a verified JWT names, and their teams.

Envoy's ``jwt_authn`` filter has checked the token (signature, issuer, audience,
expiry) and removed it; what reaches the processor is each verified payload in
the metadata Envoy forwards, one per slot the token came in. The raw token is
never seen here. A payload whose client claim is missing or not a usable name
makes the request DENIED: a valid token must name someone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.struct_pb2 import Struct, Value

from extproc.policy.access import Identity

NAMESPACE = "envoy.filters.http.jwt_authn"  # as rendered (extproc.render.jwt)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,62}")  # the client label's bound
_MAX_TEAMS = 32  # a person in hundreds of directory groups: the first 32, named teams first
NOBODY = Identity("")  # a verified token that names no usable client


@dataclass(frozen=True, slots=True)
class Claims:
    """Which claims name the client and its teams."""

    client: str = "email"
    groups: str = "groups"
    first: frozenset[str] = frozenset()  # teams with budgets or model lists: never cut off

    def identify(self, namespaces: Mapping[str, Struct]) -> Identity | None:
        """The person behind the verified payloads in ``namespaces`` (the metadata Envoy
        forwards); None when there is none, NOBODY when one names nobody or two disagree."""
        payloads = namespaces.get(NAMESPACE)
        if payloads is None or not payloads.fields:
            return None
        found = {self._person(p) for p in payloads.fields.values()}
        return found.pop() if len(found) == 1 else NOBODY

    def _person(self, payload: Value) -> Identity:
        claims = payload.struct_value.fields
        name = claims[self.client].string_value if self.client in claims else ""
        if not _NAME.fullmatch(name):
            return NOBODY
        return Identity(name, self._teams(claims.get(self.groups)))

    def _teams(self, claim: Value | None) -> tuple[str, ...]:
        if claim is None:
            return ()
        kind = claim.WhichOneof("kind")
        values = claim.list_value.values if kind == "list_value" else [claim]
        names = {v.string_value for v in values if _NAME.fullmatch(v.string_value)}
        kept = sorted(names, key=lambda name: (name not in self.first, name))[:_MAX_TEAMS]
        return tuple(sorted(kept))
