"""The credential decision as a table: no gRPC, no Envoy."""

from __future__ import annotations

import hashlib
import re
from types import MappingProxyType

import pytest

from extproc.config.model import CredentialMode
from extproc.policy.access import GatewayKeys, Identity, KeyTable
from extproc.policy.decision import Decision, Outcome, RouteRule, decide
from extproc.render.routes import NON_BLANK, NON_BLANK_AUTHORIZATION

ANTHROPIC = RouteRule("x-api-key", frozenset({"authorization", "x-api-key"}), has_secret=True)
NO_SECRET = RouteRule("x-api-key", frozenset({"authorization", "x-api-key"}), has_secret=False)
BEARER = RouteRule("authorization", frozenset({"authorization"}), has_secret=True)

CASES = [
    ("oauth bearer: client pays, nothing changes",
     ANTHROPIC, [("authorization", b"Bearer sk-ant-oat01-abc")], Decision(Outcome.CLIENT_AUTHORIZATION)),
    ("client x-api-key: client pays",
     ANTHROPIC, [("x-api-key", b"sk-ant-api03-client")], Decision(Outcome.CLIENT_API_KEY)),
    ("no credential: inject",
     ANTHROPIC, [("content-type", b"application/json")], Decision(Outcome.INJECTED)),
    ("no headers at all: inject", ANTHROPIC, [], Decision(Outcome.INJECTED)),
    ("both client headers: client pays (first seen decides the label)",
     ANTHROPIC, [("x-api-key", b"k"), ("authorization", b"Bearer t")], Decision(Outcome.CLIENT_API_KEY)),
    ("header names are case-insensitive",
     ANTHROPIC, [("X-Api-Key", b"k")], Decision(Outcome.CLIENT_API_KEY)),
    ("upper-case authorization counts",
     ANTHROPIC, [("AUTHORIZATION", b"Bearer t")], Decision(Outcome.CLIENT_AUTHORIZATION)),
    ("blank x-api-key: inject (overwrites it)",
     ANTHROPIC, [("x-api-key", b"")], Decision(Outcome.INJECTED)),
    ("whitespace authorization: inject and drop it",
     ANTHROPIC, [("authorization", b" \t ")], Decision(Outcome.INJECTED, ("authorization",))),
    ("blank authorization and blank x-api-key: drop authorization only (x-api-key is overwritten)",
     ANTHROPIC, [("authorization", b""), ("x-api-key", b"  ")], Decision(Outcome.INJECTED, ("authorization",))),
    ("blank copy then filled copy: client pays",
     ANTHROPIC, [("x-api-key", b""), ("x-api-key", b"k")], Decision(Outcome.CLIENT_API_KEY)),
    ("two blank copies: inject once",
     ANTHROPIC, [("x-api-key", b""), ("x-api-key", b" ")], Decision(Outcome.INJECTED)),
    ("non-UTF-8 bytes in another header do not matter",
     ANTHROPIC, [("x-note", b"\xe9\xff"), ("user-agent", b"claude-cli")], Decision(Outcome.INJECTED)),
    ("non-UTF-8 bytes in a client key still count as a key",
     ANTHROPIC, [("x-api-key", b"\xe9")], Decision(Outcome.CLIENT_API_KEY)),
    ("a header not in client_credentials is not a credential",
     BEARER, [("x-api-key", b"k")], Decision(Outcome.INJECTED)),
    ("bearer route: client authorization passes",
     BEARER, [("authorization", b"Bearer mine")], Decision(Outcome.CLIENT_AUTHORIZATION)),
    ("missing optional secret, no credential: reject",
     NO_SECRET, [("accept", b"*/*")], Decision(Outcome.REJECTED)),
    ("missing optional secret, blank credential: reject",
     NO_SECRET, [("x-api-key", b"")], Decision(Outcome.REJECTED)),
    ("missing optional secret, client key: client pays",
     NO_SECRET, [("x-api-key", b"k")], Decision(Outcome.CLIENT_API_KEY)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "headers", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decision(rule: RouteRule, headers: list[tuple[str, bytes]], expected: Decision) -> None:
    assert decide(rule, headers) == expected


def test_repeated_blank_headers_are_removed_once_and_in_a_stable_order() -> None:
    rule = RouteRule(
        "x-goog-api-key", frozenset({"x-goog-api-key", "x-api-key", "authorization"}), True
    )
    headers = [("x-api-key", b""), ("authorization", b" "), ("x-api-key", b"\t")]
    assert decide(rule, headers) == Decision(Outcome.INJECTED, ("authorization", "x-api-key"))
    assert decide(rule, list(reversed(headers))) == decide(rule, headers)


def keyed(for_client_credentials: bool = False) -> RouteRule:
    """A route whose server key needs a gateway key ("alice-key" belongs to alice)."""
    return RouteRule(
        "x-api-key", frozenset({"authorization", "x-api-key"}), True, alice(for_client_credentials)
    )


def alice(for_client_credentials: bool = False) -> GatewayKeys:
    """Gateway keys where "alice-key" and "gk-alice" belong to alice."""
    digests = {hashlib.sha256(k).digest(): Identity("alice") for k in (b"alice-key", b"gk-alice")}
    return GatewayKeys("x-gateway-key", KeyTable(MappingProxyType(digests)), for_client_credentials)


def rule(mode: CredentialMode = CredentialMode.PREFER_CLIENT, keys: GatewayKeys | None = None,
         placeholders: tuple[bytes, ...] = (), header: str = "x-api-key") -> RouteRule:  # fmt: skip
    return RouteRule(header, frozenset({"authorization", "x-api-key"}), True, keys, mode,
                     frozenset(placeholders))  # fmt: skip


PREFER, REPLACE = CredentialMode.PREFER_CLIENT, CredentialMode.REPLACE_CLIENT
REJECT, CLIENT_ONLY = CredentialMode.REJECT_CLIENT, CredentialMode.CLIENT_ONLY
FORWARD = RouteRule(
    "", frozenset({"authorization", "x-api-key"}), False, alice(), forward_only=True
)
FORWARD_NO_KEYS = RouteRule(
    "", frozenset({"authorization", "x-api-key"}), False, None, forward_only=True
)
OAUTH = ("authorization", b"Bearer sk-ant-oat01-x")


KEY_CASES = [
    ("valid gateway key, no credential: inject for alice",
     keyed(), [("x-gateway-key", b"alice-key")], Decision(Outcome.INJECTED, client="alice")),
    ("no gateway key, no credential: its own outcome, not a bad key",
     keyed(), [("accept", b"*/*")], Decision(Outcome.NO_CREDENTIAL)),
    ("wrong gateway key: denied", keyed(), [("x-gateway-key", b"guess")], Decision(Outcome.DENIED)),
    ("blank gateway key: denied", keyed(), [("x-gateway-key", b"")], Decision(Outcome.DENIED)),
    ("two copies of one valid key: one key, inject for alice",
     keyed(), [("x-gateway-key", b"alice-key"), ("x-gateway-key", b"alice-key")], Decision(Outcome.INJECTED, client="alice")),
    ("two different keys, one valid: denied",
     keyed(), [("x-gateway-key", b"alice-key"), ("x-gateway-key", b"bob-key")], Decision(Outcome.DENIED)),
    ("gateway key header name is case-insensitive",
     keyed(), [("X-Gateway-Key", b"alice-key")], Decision(Outcome.INJECTED, client="alice")),
    ("own credential without gateway key: client pays (default policy)",
     keyed(), [("authorization", b"Bearer sk-ant-oat01-x")], Decision(Outcome.CLIENT_AUTHORIZATION)),
    ("own credential, strict policy, no gateway key: denied",
     keyed(True), [("x-api-key", b"mine")], Decision(Outcome.DENIED)),
    ("own credential, strict policy, valid gateway key: client pays, named",
     keyed(True), [("x-api-key", b"mine"), ("x-gateway-key", b"alice-key")],
     Decision(Outcome.CLIENT_API_KEY, client="alice")),
    ("valid gateway key and a blank authorization: inject and drop it",
     keyed(), [("authorization", b" "), ("x-gateway-key", b"alice-key")],
     Decision(Outcome.INJECTED, ("authorization",), "alice")),
]  # fmt: skip


SLOT_CASES = [
    ("gateway key as x-api-key: injected over it, named",
     keyed(), [("x-api-key", b"gk-alice")], Decision(Outcome.INJECTED, client="alice")),
    ("gateway key as Bearer: removed, x-api-key injected, named",
     keyed(), [("authorization", b"Bearer gk-alice")], Decision(Outcome.INJECTED, ("authorization",), "alice")),
    ("gateway key as bare Authorization value: removed",
     keyed(), [("authorization", b"gk-alice")], Decision(Outcome.INJECTED, ("authorization",), "alice")),
    ("gateway key as Bearer on a bearer route: overwritten, not removed",
     rule(keys=alice(), header="authorization"), [("authorization", b"Bearer gk-alice")],
     Decision(Outcome.INJECTED, client="alice")),
    ("invalid gateway key as x-api-key: denied, never passed on as a client key",
     keyed(), [("x-api-key", b"gk-typo")], Decision(Outcome.DENIED)),
    ("gateway-key prefix on a route without keys: denied",
     rule(), [("x-api-key", b"gk-alice")], Decision(Outcome.DENIED)),
    ("gateway-key prefix beside OAuth on a route without keys: denied",
     rule(), [OAUTH, ("x-api-key", b"gk-alice")], Decision(Outcome.DENIED)),
    ("OAuth plus valid key in x-api-key: client pays, key removed, named",
     keyed(), [OAUTH, ("x-api-key", b"gk-alice")], Decision(Outcome.CLIENT_AUTHORIZATION, ("x-api-key",), "alice")),
    ("OAuth plus invalid key in x-api-key: denied",
     keyed(), [OAUTH, ("x-api-key", b"gk-bob")], Decision(Outcome.DENIED)),
    ("same key in x-api-key and the access header: one key",
     keyed(), [("x-api-key", b"gk-alice"), ("x-gateway-key", b"gk-alice")], Decision(Outcome.INJECTED, client="alice")),
    ("different keys in two slots: denied",
     keyed(), [("authorization", b"Bearer gk-alice"), ("x-api-key", b"gk-other")], Decision(Outcome.DENIED)),
    ("upper-case header and scheme: still a gateway key",
     keyed(), [("AUTHORIZATION", b"BEARER gk-alice")], Decision(Outcome.INJECTED, ("authorization",), "alice")),
    ("gateway key in the access header is not removed by the processor (Envoy strips it)",
     keyed(), [("x-gateway-key", b"gk-alice")], Decision(Outcome.INJECTED, client="alice")),
    ("prefix is case-sensitive: GK- is a client key",
     rule(), [("x-api-key", b"GK-alice")], Decision(Outcome.CLIENT_API_KEY)),
    ("a key containing gk- later is a client key",
     rule(), [("x-api-key", b"sk-gk-1")], Decision(Outcome.CLIENT_API_KEY)),
]  # fmt: skip

PLACEHOLDER_CASES = [
    ("placeholder x-api-key: inject over it",
     rule(placeholders=(b"dummy",)), [("x-api-key", b"dummy")], Decision(Outcome.INJECTED)),
    ("placeholder bearer: inject and drop it",
     rule(placeholders=(b"sk-no-key-required",)), [("authorization", b"Bearer sk-no-key-required")],
     Decision(Outcome.INJECTED, ("authorization",))),
    ("placeholders are exact: dummy2 is a key",
     rule(placeholders=(b"dummy",)), [("x-api-key", b"dummy2")], Decision(Outcome.CLIENT_API_KEY)),
    ("placeholders are case-sensitive",
     rule(placeholders=(b"EMPTY",)), [("x-api-key", b"empty")], Decision(Outcome.CLIENT_API_KEY)),
    ("no placeholders configured: dummy is a key",
     rule(), [("x-api-key", b"dummy")], Decision(Outcome.CLIENT_API_KEY)),
    ("placeholder beside OAuth: client pays, placeholder left alone",
     rule(placeholders=(b"dummy",)), [OAUTH, ("x-api-key", b"dummy")], Decision(Outcome.CLIENT_AUTHORIZATION)),
    ("placeholder with a route's gateway keys: still needs a key (a placeholder is no credential)",
     rule(keys=alice(), placeholders=(b"dummy",)), [("x-api-key", b"dummy")], Decision(Outcome.NO_CREDENTIAL)),
]  # fmt: skip

MODE_CASES = [
    ("replace_client: OAuth removed, server key injected",
     rule(REPLACE), [OAUTH], Decision(Outcome.REPLACED, ("authorization",))),
    ("replace_client: client x-api-key overwritten",
     rule(REPLACE), [("x-api-key", b"sk-ant-api03-mine")], Decision(Outcome.REPLACED)),
    ("replace_client: nothing sent, injected",
     rule(REPLACE), [], Decision(Outcome.INJECTED)),
    ("replace_client with keys: a client credential alone is denied",
     rule(REPLACE, alice()), [OAUTH], Decision(Outcome.DENIED)),
    ("replace_client with keys: key plus OAuth, OAuth removed, named",
     rule(REPLACE, alice()), [OAUTH, ("x-gateway-key", b"gk-alice")], Decision(Outcome.REPLACED, ("authorization",), "alice")),
    ("reject_client: OAuth refused",
     rule(REJECT), [OAUTH], Decision(Outcome.REFUSED)),
    ("reject_client: nothing sent, injected",
     rule(REJECT), [("x-api-key", b" ")], Decision(Outcome.INJECTED)),
    ("reject_client with a valid key and OAuth: refused, named",
     rule(REJECT, alice()), [OAUTH, ("x-api-key", b"gk-alice")], Decision(Outcome.REFUSED, client="alice")),
    ("client_only: own key passes",
     rule(CLIENT_ONLY), [("x-api-key", b"sk-ant-api03-mine")], Decision(Outcome.CLIENT_API_KEY)),
    ("client_only: nothing sent, rejected",
     RouteRule("x-api-key", frozenset({"x-api-key", "authorization"}), False, None, CLIENT_ONLY), [], Decision(Outcome.REJECTED)),
    ("client_only with a valid gateway key and no credential: rejected, named",
     RouteRule("x-api-key", frozenset({"x-api-key", "authorization"}), False, alice(), CLIENT_ONLY),
     [("x-api-key", b"gk-alice")], Decision(Outcome.REJECTED, client="alice")),
    ("client_only with keys: own key needs none by default",
     RouteRule("x-api-key", frozenset({"x-api-key", "authorization"}), False, alice(), CLIENT_ONLY),
     [OAUTH], Decision(Outcome.CLIENT_AUTHORIZATION)),
    ("forward-only route, valid key in x-api-key: removed, forwarded, named",
     FORWARD, [("x-api-key", b"gk-alice")], Decision(Outcome.FORWARDED, ("x-api-key",), "alice")),
    ("forward-only route, valid Bearer key and nothing else: removed",
     FORWARD, [("authorization", b"Bearer gk-alice")], Decision(Outcome.FORWARDED, ("authorization",), "alice")),
    ("forward-only route, own key plus gateway key: client pays, key removed",
     FORWARD, [OAUTH, ("x-api-key", b"gk-alice")], Decision(Outcome.CLIENT_AUTHORIZATION, ("x-api-key",), "alice")),
    ("forward-only route, invalid key: denied",
     FORWARD, [("x-api-key", b"gk-bad")], Decision(Outcome.DENIED)),
    ("forward-only route without keys, any gk- value: denied",
     FORWARD_NO_KEYS, [("x-api-key", b"gk-alice")], Decision(Outcome.DENIED)),
    ("forward-only route, no key at all: forwarded untouched",
     FORWARD, [("x-api-key", b"")], Decision(Outcome.FORWARDED)),
]  # fmt: skip

ALL_KEY_CASES = KEY_CASES + SLOT_CASES + PLACEHOLDER_CASES + MODE_CASES


@pytest.mark.parametrize(
    ("rule", "headers", "expected"),
    [c[1:] for c in ALL_KEY_CASES],
    ids=[c[0] for c in ALL_KEY_CASES],
)
def test_decision_with_gateway_keys(
    rule: RouteRule, headers: list[tuple[str, bytes]], expected: Decision
) -> None:
    assert decide(rule, headers) == expected


@pytest.mark.parametrize(
    ("value", "blank"),
    [(b"Bearer ", True), (b"bearer", True), (b"  BASIC  ", True), (b"Bearer sk-ant-oat01-x", False),
     (b"sk-ant-api03-bare-token", False), (b"Bearer ,", False), (b"", True)],
)  # fmt: skip
def test_an_authorization_scheme_without_a_token_is_blank(value: bytes, blank: bool) -> None:
    expected = Decision(Outcome.INJECTED) if blank else Decision(Outcome.CLIENT_AUTHORIZATION)
    rule = RouteRule("authorization", frozenset({"authorization"}), True)
    assert decide(rule, [("authorization", value)]) == expected


@pytest.mark.parametrize(
    "value",
    [b"Bearer sk-ant-oat01-x", b"Bearer x,Bearer y", b"Basic abc", b" Bearer  t ", b"Bearer ", b"Bearer",
     b"sk-ant-bare", b"Bearer ,", b",", b"  ", b""],
)  # fmt: skip
def test_the_fast_path_pattern_only_skips_what_the_processor_passes_through(value: bytes) -> None:
    """Envoy's header-matched route must never skip a request the processor would inject for."""
    for name, pattern in (("authorization", NON_BLANK_AUTHORIZATION), ("x-api-key", NON_BLANK)):
        if re.fullmatch(pattern, value.decode()):
            rule = RouteRule(name, frozenset({name}), True)
            assert decide(rule, [(name, value)]).outcome is not Outcome.INJECTED, (name, value)
