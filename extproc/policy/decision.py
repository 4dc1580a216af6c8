"""The credential decision: a pure function of one route's rule and the request headers.

Nothing here knows about gRPC or protobuf, so the whole rule set is tested as
a table. The rule:

1. A value that starts with the gateway-key prefix (``gk-``, also as
   ``Authorization: Bearer gk-…``) in any credential slot is a gateway key and
   never goes upstream: a valid one names the client (and carries its teams and
   expiry, which the processor checks) and is removed; any
   other is DENIED (401), so a mistyped key is never sent to a provider. The
   access header (which Envoy strips on every route) is checked when a key is
   needed or one is presented in a slot too; all presented must be one key.
2. A non-blank value in one of the route's client credential headers that is
   not a placeholder is the client's own credential. What happens to it is the
   route's mode: it passes (``prefer_client``, ``client_only``), is replaced
   by the server's (``replace_client``) or is REFUSED (``reject_client``).
3. Spending the server's credential needs a valid gateway key where the route
   has keys (a client's own credential needs one only with
   ``for_client_credentials``); otherwise DENIED, or NO_CREDENTIAL when the
   request carried no key and no credential of its own at all. Injecting drops the blank
   and placeholder credential headers, so the upstream sees only the server's;
   with no server credential the request is REJECTED (401).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from extproc.config.model import KEY_PREFIX, STANDARD_SLOTS, CredentialMode
from extproc.policy.access import GatewayKeys, Identity


class Outcome(Enum):
    """What happened to a request; the values are the metric/access-log labels."""

    CLIENT_AUTHORIZATION = "client_authorization"
    CLIENT_API_KEY = "client_api_key"
    INJECTED = "injected"
    REPLACED = "replaced"  # the client's credential was removed and the server's injected
    FORWARDED = "forwarded"  # a route without a server credential, and no client credential
    REJECTED = "rejected"  # a credential was needed and none could be used: 401
    REFUSED = "refused"  # the route takes only the server's credential, the client sent one: 401
    DENIED = "denied"  # gateway key missing or invalid, while something else was sent: 401
    NO_CREDENTIAL = "no_credential"  # a key was needed and nothing at all was sent: 401
    EXPIRED = "expired"  # a valid gateway key past its expiry (checked by the processor): 401
    LIMITED = "limited"  # the client is over a limit on the organisation's key: 429
    UNKNOWN_ROUTE = "unknown_route"  # Envoy named a route the processor does not know: 503

    @property
    def credential_source(self) -> str:
        """Who pays: ``client``, ``injected`` or ``none`` (for the access log)."""
        if self in (Outcome.INJECTED, Outcome.REPLACED):
            return "injected"
        return "client" if self.value.startswith("client") else "none"


# An Authorization value that is only a scheme ("Bearer " from an empty token variable)
# carries no credential: it counts as blank.
_BARE_SCHEMES = frozenset({b"bearer", b"basic"})
_KEY_PREFIX = KEY_PREFIX.encode()
_JWT_START = b"eyJ"  # base64url of '{"': how every JWT begins
_NOBODY: tuple[str, float, tuple[str, ...]] = ("", math.inf, ())  # no key: Decision's defaults


def token_of(name: str, value: bytes) -> bytes:
    """The credential in a header value: for Authorization, what follows the scheme."""
    stripped = value.strip()
    if name == "authorization":
        words = stripped.split(None, 1)
        if len(words) == 2 or (words and words[0].lower() in _BARE_SCHEMES):
            return words[1].strip() if len(words) == 2 else b""
    return stripped


def gateway_key(value: bytes) -> bytes | None:
    """The gateway key a credential header carries: None for none, b"" for a malformed one.

    A value is taken for a gateway key when any comma-separated part's first or second
    word starts with ``gk-`` (Envoy's route table sends every value containing ``gk-`` here,
    a superset). Only ``gk-…`` alone or after one
    scheme word (``Bearer gk-…``) is a well-formed key; anything else with ``gk-`` in those
    places (``gk-key extra``, ``sk-own,gk-key``) is malformed: it is never a client's own
    credential, and never valid.
    """
    parts = value.split(b",")
    flagged = [p for p in parts if any(w.startswith(_KEY_PREFIX) for w in p.split()[:2])]
    if not flagged:
        return None
    words = flagged[0].split()
    alone = len(words) == 1 or (len(words) == 2 and not words[0].startswith(_KEY_PREFIX))
    well_formed = len(parts) == 1 and alone and words[-1].startswith(_KEY_PREFIX)
    return words[-1] if well_formed else b""


@dataclass(frozen=True, slots=True)
class RouteRule:
    """The part of a route's policy the decision needs."""

    header: str  # the header the server credential goes into
    client_credentials: frozenset[str]  # lower-case names; a non-blank one means "client pays"
    has_secret: bool  # False: no server credential (optional and missing, or client_only)
    keys: GatewayKeys | None = None
    mode: CredentialMode = CredentialMode.PREFER_CLIENT
    placeholders: frozenset[bytes] = frozenset()  # tokens that count as blank
    forward_only: bool = False  # a route with no credential section: only gateway keys matter
    people: bool = False  # SSO on: a JWT left in a slot is one Envoy did not verify


class Decision(NamedTuple):  # a tuple: cheap to build once per request
    outcome: Outcome
    remove: tuple[str, ...] = ()  # headers to drop: gateway keys, blank or replaced credentials
    client: str = ""  # the gateway key's client name, when one was presented and valid
    expires: float = math.inf  # that key's expiry (seconds since the epoch)
    teams: tuple[str, ...] = ()  # that client's teams


class _Seen(NamedTuple):
    paying: Outcome | None  # the client's own credential, by the header it came in
    blank: list[str]  # credential headers with nothing usable (blank or placeholder)
    filled: list[str]  # credential headers with the client's own credential
    keyed: list[str]  # headers that carried a gateway key
    presented: set[bytes]  # the distinct gateway keys presented


def _scan(rule: RouteRule, headers: Iterable[tuple[str, bytes]]) -> _Seen:
    blank: list[str] = []
    filled: list[str] = []
    keyed: list[str] = []
    presented: set[bytes] = set()
    paying = None
    key_header = rule.keys.header if rule.keys else None
    for name, value in headers:
        lower = name.lower()
        if lower == key_header:  # Envoy strips this header on every route
            presented.add(value.strip())
        elif lower in STANDARD_SLOTS or lower in rule.client_credentials:
            if rule.people and token_of(lower, value).startswith(_JWT_START):
                _add(keyed, lower)  # never passed on: denied like a malformed gateway key
                presented.add(b"")
                continue
            key = gateway_key(value)
            if key is not None:
                _add(keyed, lower)
                presented.add(key)
            elif lower in rule.client_credentials:
                token = token_of(lower, value)
                if not token or token in rule.placeholders:
                    _add(blank, lower)
                else:
                    _add(filled, lower)
                    paying = paying or _paying(lower)
    return _Seen(paying, blank, filled, keyed, presented)


def _paying(header: str) -> Outcome:
    return Outcome.CLIENT_AUTHORIZATION if header == "authorization" else Outcome.CLIENT_API_KEY


def _add(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


def decide(
    rule: RouteRule, headers: Iterable[tuple[str, bytes]], person: Identity | None = None
) -> Decision:
    """Decide for one request; ``headers`` are (name, raw value) pairs as Envoy sent them.

    Names are compared case-insensitively; values are bytes, so non-UTF-8
    bytes anywhere never matter. Repeated credential headers count as filled if
    any copy is filled; gateway keys presented more than once must all be the
    same key. ``person`` is who a JWT verified by Envoy names: it stands for a valid
    gateway key (a key sent beside it must name the same client).
    """
    seen = _scan(rule, headers)
    who = _NOBODY
    # A gateway key in a credential slot is always checked: it must not pass on as a
    # credential. One in the access header only when needed (Envoy strips that header).
    if person is not None or seen.keyed or _needs_key(rule, seen.paying is not None):
        found = _vouched(rule.keys, seen.presented, person)
        if found is None:  # nothing at all (Claude Code's HEAD at start-up) is not a bad key
            nothing = person is None and not seen.presented and seen.paying is None
            return Decision(Outcome.NO_CREDENTIAL if nothing else Outcome.DENIED)
        who = (found.name, found.expires, found.teams)
    if seen.paying is not None and rule.mode.client_passes:
        return Decision(seen.paying, _sorted(seen.keyed, rule.header, inject=False), *who)
    if seen.paying is not None and rule.mode is CredentialMode.REJECT_CLIENT:
        return Decision(Outcome.REFUSED, (), *who)
    if rule.forward_only:
        return Decision(Outcome.FORWARDED, _sorted(seen.keyed, rule.header, inject=False), *who)
    if not rule.has_secret:
        return Decision(Outcome.REJECTED, (), *who)
    outcome = Outcome.INJECTED if seen.paying is None else Outcome.REPLACED
    dropped = seen.keyed + seen.blank + seen.filled
    return Decision(outcome, _sorted(dropped, rule.header, inject=True), *who)


def _needs_key(rule: RouteRule, paying: bool) -> bool:
    """Whether this request must show a valid gateway key to go on."""
    if rule.keys is None or rule.forward_only:
        return False
    spends_ours = not paying or not rule.mode.client_passes
    return spends_ours or rule.keys.for_client_credentials


def _vouched(
    keys: GatewayKeys | None, presented: set[bytes], person: Identity | None
) -> Identity | None:
    """Who a valid gateway key or a verified JWT names (both, when both are sent, the same)."""
    if person is None:
        return _identify(keys, presented)
    if not person.name:
        return None
    key = _identify(keys, presented) if presented else person
    if key is None or key.name != person.name:
        return None
    return Identity(person.name, person.teams)  # never expires here: Envoy checked the token


def _identify(keys: GatewayKeys | None, presented: set[bytes]) -> Identity | None:
    if keys is None or len(presented) != 1:
        return None
    return keys.identify(next(iter(presented)))


def _sorted(names: list[str], header: str, inject: bool) -> tuple[str, ...]:
    """The headers to remove; the injected header is overwritten, not removed."""
    return tuple(sorted({n for n in names if not (inject and n == header)}))
