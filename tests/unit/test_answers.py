"""Signals that mean what they say: the decisions and usage metrics' client label is bounded.

Only clients with limits of their own (named in ``limits.clients``, so bounded by the
config) get series of their own; every other gateway client shares ``(other)``, and a
reload that drops a client's limits forgets its series.
"""

from __future__ import annotations

from extproc.config.model import Limit
from extproc.policy.decision import Outcome
from extproc.policy.limits import LimitTable
from extproc.policy.processor import Answer
from extproc.server.metrics import OTHER_CLIENTS, Metrics
from extproc.usage.record import UsageRecord


def series(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    """The decisions counter's samples by (route, outcome, client)."""
    [family] = [f for f in metrics.registry.collect() if f.name == "gateway_decisions"]
    return {
        (s.labels["route"], s.labels["outcome"], s.labels["client"]): s.value
        for s in family.samples
        if s.name.endswith("_total")
    }


def answer(client: str, outcome: Outcome = Outcome.INJECTED) -> Answer:
    return Answer(b"", "anthropic", outcome, client)


def limits(*names: str) -> LimitTable:
    return LimitTable(Limit(), {name: Limit(requests_per_minute=5) for name in names})


def test_only_clients_with_limits_of_their_own_get_their_own_series() -> None:
    metrics = Metrics()
    table = limits("alice")
    for client in ("alice", "alice", "bob", "carol", ""):
        metrics.decided(answer(client), 1e-5, table)
    metrics.decided(answer("", Outcome.NO_CREDENTIAL), 1e-5, table)
    assert series(metrics) == {
        ("anthropic", "injected", "alice"): 2,
        ("anthropic", "injected", OTHER_CLIENTS): 2,  # bob and carol, in one series
        ("anthropic", "injected", ""): 1,  # no gateway key
        ("anthropic", "no_credential", ""): 1,
    }


def test_without_limits_every_gateway_client_shares_one_series() -> None:
    metrics = Metrics()
    for client in (f"client{n}" for n in range(50)):
        metrics.decided(answer(client), 1e-5, None)
    assert series(metrics) == {("anthropic", "injected", OTHER_CLIENTS): 50}


def test_a_reload_that_drops_a_clients_limits_forgets_its_series() -> None:
    metrics = Metrics()
    metrics.decided(answer("alice"), 1e-5, limits("alice", "bob"))
    metrics.decided(answer("bob"), 1e-5, limits("alice", "bob"))
    metrics.decided(answer("alice"), 1e-5, limits("bob"))  # reloaded: alice has no limits now
    assert series(metrics) == {
        ("anthropic", "injected", "bob"): 1,
        ("anthropic", "injected", OTHER_CLIENTS): 1,
    }
    assert metrics.client_label("alice") == OTHER_CLIENTS
    assert metrics.client_label("bob") == "bob"


def usage_series(metrics: Metrics) -> dict[str, float]:
    """The usage tokens counter's samples by client."""
    [family] = [f for f in metrics.registry.collect() if f.name == "gateway_usage_tokens"]
    return {s.labels["client"]: s.value for s in family.samples if s.name.endswith("_total")}


def used(client: str) -> UsageRecord:
    return UsageRecord(0.0, "r", "anthropic", client, (), "injected", "claude", 200, 1, output=3)


def test_usage_series_are_bounded_like_decisions_and_forgotten_on_reload() -> None:
    metrics = Metrics()
    table = limits("alice")
    for n in range(50):
        metrics.usage(used(f"person{n}"), table)
    metrics.usage(used("alice"), table)
    metrics.usage(used(""), table)  # the client paid: no gateway client
    assert usage_series(metrics) == {OTHER_CLIENTS: 150, "alice": 3, "": 3}
    metrics.usage(used("bob"), limits("bob"))  # reloaded: alice has no limits now
    assert usage_series(metrics) == {OTHER_CLIENTS: 150, "bob": 3, "": 3}
