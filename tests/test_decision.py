"""The credential decision as a table: no gRPC, no Envoy."""

from __future__ import annotations

import pytest

from extproc.decision import Decision, Outcome, RouteRule, decide

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
