"""Cost per record, checked by hand against the price table (USD per million tokens)."""

from __future__ import annotations

import socket
from decimal import Decimal

import pytest

from extproc.config.spend import Price
from extproc.spend.prices import PriceBook, nano, usd
from extproc.usage.record import UsageRecord

T = 1_765_000_000.0  # Dec 2025: every model below is priced then


def rec(model: str, status: int = 200, **tokens: int | None) -> UsageRecord:
    return UsageRecord(T, "r1", "anthropic", "alice", (), "injected", model, status, 10, **tokens)


# (what, model, tokens, USD worked out by hand from the table)
HAND = [
    # claude-sonnet-4-5: $3 in, $15 out, $0.30 cache read, $3.75 5-min write, $6 1-hour write
    ("sonnet 4.5, every token kind", "claude-sonnet-4-5-20250929",
     {"input": 1000, "output": 10, "cache_read": 2000, "cache_creation_5m": 100, "cache_creation_1h": 100},
     "0.003" "+0.00015" "+0.0006" "+0.000375" "+0.0006"),
    # a 1-hour write costs 2x the input price, a 5-minute write 1.25x
    ("sonnet 4.5, 100k 5-minute writes", "claude-sonnet-4-5", {"input": 0, "output": 0, "cache_creation_5m": 100_000}, "0.375"),
    ("sonnet 4.5, 100k 1-hour writes", "claude-sonnet-4-5", {"input": 0, "output": 0, "cache_creation_1h": 100_000}, "0.6"),
    # over 200k input tokens (cache included) the long-context tier applies: $6 in, $22.50 out
    ("sonnet 4.5, long context", "claude-sonnet-4-5", {"input": 250_000, "output": 1000}, "1.5+0.0225"),
    # claude-opus-4-1: $15 in, $75 out
    ("opus 4.1", "claude-opus-4-1", {"input": 10, "output": 100}, "0.00015+0.0075"),
    # claude-3-5-haiku: $0.80 in, $1.60 1-hour write
    ("haiku 3.5", "claude-3-5-haiku-20241022", {"input": 10**6, "output": 0, "cache_creation_1h": 10**6}, "0.8+1.6"),
    # gpt-4o-mini: $0.15 in, $0.60 out, $0.075 cached input
    ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", {"input": 1000, "output": 1000, "cache_read": 1000}, "0.00015+0.0006+0.000075"),
]  # fmt: skip


def total(expression: str) -> Decimal:
    return sum((Decimal(p) for p in expression.split("+")), Decimal(0))


@pytest.mark.parametrize(("what", "model", "tokens", "expected"), HAND, ids=[h[0] for h in HAND])
def test_cost_matches_the_price_table_by_hand(
    what: str, model: str, tokens: dict[str, int], expected: str
) -> None:
    cost = PriceBook().cost(rec(model, **tokens))
    assert cost == nano(total(expected))
    assert cost is not None and usd(cost) == total(expected)


def test_an_override_prices_a_private_model_and_wins_over_the_table() -> None:
    price = Price(Decimal(2), Decimal(4), Decimal("0.2"), Decimal("2.5"), Decimal(4))
    book = PriceBook((("claude-opus-4-1", price), ("ours", price)))
    tokens = {
        "input": 1000,
        "output": 1000,
        "cache_read": 1000,
        "cache_creation_5m": 1000,
        "cache_creation_1h": 1000,
    }
    assert book.cost(rec("ours", **tokens)) == nano(
        Decimal("0.002")
        + Decimal("0.004")
        + Decimal("0.0002")
        + Decimal("0.0025")
        + Decimal("0.004")
    )
    assert book.cost(rec("claude-opus-4-1", input=10**6, output=0)) == 2 * 10**9
    assert "overrides" in book.version and "genai-prices" in book.version


def test_cache_tokens_an_override_has_no_price_for_are_unknown_not_free() -> None:
    book = PriceBook((("ours", Price(Decimal(1), Decimal(1))),))
    assert book.cost(rec("ours", input=10, output=10)) == 20_000
    assert book.cost(rec("ours", input=10, output=10, cache_read=5)) is None


def test_an_unknown_model_is_unknown_cost_reported_once_per_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []
    book = PriceBook(on_unknown=seen.append)
    for _ in range(3):
        assert book.cost(rec("no-such-model-xyz", input=10, output=10)) is None
    assert book.cost(rec("", input=10, output=10)) is None
    assert seen == ["no-such-model-xyz", ""]
    assert sum("no-such-model-xyz" in r.message for r in caplog.records) == 1


def test_an_answer_without_usage_costs_nothing_unless_its_model_was_reported() -> None:
    book = PriceBook()
    assert book.cost(rec("claude-opus-4-1", status=529)) == 0  # an error
    assert book.cost(rec("", status=200)) == 0  # count_tokens, the models list
    assert book.cost(rec("claude-opus-4-1", status=200)) is None  # its usage was lost


def test_pricing_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pricing opened a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert PriceBook().cost(rec("claude-opus-4-5", input=10**6, output=0)) == 5 * 10**9


def test_the_fast_arithmetic_agrees_with_genai_prices_for_every_model_it_takes() -> None:
    from datetime import UTC, datetime

    from genai_prices.data_snapshot import get_snapshot

    from extproc.spend.prices import _tokens_only, _usage

    usages = [
        {
            "input": 1000,
            "output": 10,
            "cache_read": 2000,
            "cache_creation_5m": 100,
            "cache_creation_1h": 100,
        },
        {
            "input": 250_000,
            "output": 5000,
            "cache_read": 0,
            "cache_creation_5m": 0,
            "cache_creation_1h": 0,
        },
        {
            "input": 3,
            "output": 0,
            "cache_read": 300_000,
            "cache_creation_5m": 7,
            "cache_creation_1h": 0,
        },
        {
            "input": 0,
            "output": 1,
            "cache_read": None,
            "cache_creation_5m": None,
            "cache_creation_1h": 90_000,
        },
    ]
    checked = 0
    for provider in get_snapshot().providers:
        for model in provider.models:
            try:
                price = model.get_prices(datetime.fromtimestamp(T, UTC))
            except LookupError:
                continue
            quick = _tokens_only(price)
            if quick is None:
                continue
            for tokens in usages:
                record = rec(model.id, **tokens)
                assert quick(record) == price.calc_price(_usage(record))["total_price"], model.id
            checked += 1
    assert checked > 1000  # nearly every model in the table has token prices only
