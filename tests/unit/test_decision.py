"""The credential decision as a table: no gRPC, no Envoy."""

from __future__ import annotations

import hashlib
import re

import pytest

from extproc.policy.access import GatewayKeys
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
    keys = GatewayKeys(
        "x-gateway-key", read_keys_text("alice", "alice-key"), for_client_credentials
    )
    return RouteRule("x-api-key", frozenset({"authorization", "x-api-key"}), True, keys)


def read_keys_text(name: str, key: str) -> tuple[tuple[bytes, str], ...]:
    return ((hashlib.sha256(key.encode()).digest(), name),)


KEY_CASES = [
    ("valid gateway key, no credential: inject for alice",
     keyed(), [("x-gateway-key", b"alice-key")], Decision(Outcome.INJECTED, client="alice")),
    ("no gateway key, no credential: denied",
     keyed(), [("accept", b"*/*")], Decision(Outcome.DENIED)),
    ("wrong gateway key: denied", keyed(), [("x-gateway-key", b"guess")], Decision(Outcome.DENIED)),
    ("blank gateway key: denied", keyed(), [("x-gateway-key", b"")], Decision(Outcome.DENIED)),
    ("two gateway keys, even valid ones: denied",
     keyed(), [("x-gateway-key", b"alice-key"), ("x-gateway-key", b"alice-key")], Decision(Outcome.DENIED)),
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


@pytest.mark.parametrize(
    ("rule", "headers", "expected"), [c[1:] for c in KEY_CASES], ids=[c[0] for c in KEY_CASES]
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
