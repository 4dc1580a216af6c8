"""Cases that pin down pricing and budgets where broader tests let a wrong change pass.

Each table here was written against a mutation run (mutmut) of one module:
prices.py, budgets.py and periods.py. A case exists because some plausible
wrong version of the code passed every other fast test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from genai_prices.data_snapshot import DataSnapshot
from genai_prices.types import ModelPrice, Tier, TieredPrices

from extproc.config.spend import Budget, Period, Spend
from extproc.spend import prices
from extproc.spend.budgets import ORGANISATION, Budgets
from extproc.spend.periods import Calendar
from extproc.spend.prices import PriceBook, nano
from extproc.usage.record import UsageRecord

T = 1_765_000_000.0  # Dec 2025


def rec(model: str, at: float = T, status: int = 200, **tokens: int | None) -> UsageRecord:
    return UsageRecord(at, "r1", "anthropic", "alice", (), "injected", model, status, 10, **tokens)


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# --- prices.py ---------------------------------------------------------------------------

# (USD, nano-dollars): exact halves go to the even neighbour
HALVES = [
    ("0.0000000005", 0),
    ("0.0000000015", 2),
    ("0.0000000025", 2),
    ("0.0000000035", 4),
    ("1.0000000005", 1_000_000_000),
]


@pytest.mark.parametrize(("amount", "expected"), HALVES, ids=[h[0] for h in HALVES])
def test_nano_rounds_half_to_even_whatever_the_decimal_context_says(
    amount: str, expected: int
) -> None:
    with localcontext(rounding=ROUND_HALF_UP):
        assert nano(Decimal(amount)) == expected


# (status, model, cost of a record without token counts)
NO_TOKENS = [
    (200, "claude-opus-4-1", None),
    (299, "claude-opus-4-1", None),
    (300, "claude-opus-4-1", 0),
    (199, "claude-opus-4-1", 0),
    (304, "claude-opus-4-1", 0),
    (200, "", 0),
]


@pytest.mark.parametrize(("status", "model", "expected"), NO_TOKENS)
def test_only_a_2xx_that_named_its_model_and_no_tokens_is_an_unknown_cost(
    status: int, model: str, expected: int | None
) -> None:
    assert PriceBook().cost(rec(model, status=status)) == expected


def test_a_model_is_looked_up_once_and_priced_the_same_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked_up: list[str] = []
    real = prices._from_table

    def counting(table: DataSnapshot, model: str) -> prices.Pricer | None:
        looked_up.append(model)
        return real(table, model)

    monkeypatch.setattr(prices, "_from_table", counting)
    book = PriceBook()
    costs = [book.cost(rec("claude-opus-4-1", input=10**6, output=0)) for _ in range(3)]
    assert costs == [15 * 10**9] * 3
    assert looked_up == ["claude-opus-4-1"]


def test_the_unknown_model_warning_says_what_happens_and_shows_80_characters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = "m" * 80 + "TAIL" + "x" * 20
    with caplog.at_level(logging.WARNING, "extproc.spend"):
        assert PriceBook().cost(rec(model, input=1, output=1)) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"no price for model {'m' * 80!r}: its cost is counted as unknown"
    ]


@pytest.fixture
def host_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The process's local time zone set to the case's (TZ), restored afterwards."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


# claude-opus-4-6: before 2026-03-13 (UTC) over 200k input tokens cost $10/MTok, from then on $5
# (when, host time zone, USD for 250k input tokens)
HISTORY = [
    ("2026-02-01T12:00:00", "UTC", "2.5"),
    ("2026-04-01T12:00:00", "UTC", "1.25"),
    ("2026-03-12T23:30:00", "Asia/Tokyo", "2.5"),  # already the 13th in Tokyo
    ("2026-03-13T00:30:00", "America/New_York", "1.25"),  # still the 12th in New York
]


@pytest.mark.parametrize(
    ("when", "host_zone", "expected"), HISTORY, indirect=["host_zone"], ids=[h[0] for h in HISTORY]
)
def test_a_record_is_priced_at_the_price_in_force_on_its_utc_date(
    when: str, host_zone: str, expected: str
) -> None:
    assert PriceBook().cost(rec("claude-opus-4-6", utc(when), input=250_000)) == nano(
        Decimal(expected)
    )


def test_one_book_prices_each_record_at_its_own_time_in_either_order() -> None:
    old, new = utc("2026-02-01T12:00:00"), utc("2026-04-01T12:00:00")
    for times in ((old, new, old), (new, old, new)):
        book = PriceBook()
        costs = [book.cost(rec("claude-opus-4-6", at, input=250_000)) for at in times]
        assert costs == [nano(Decimal("2.5") if at == old else Decimal("1.25")) for at in times]


def test_a_price_with_more_than_tokens_goes_through_genai_prices() -> None:
    # gpt-audio also has audio prices: $2.50 text in, $10 text out
    cost = PriceBook().cost(rec("gpt-audio", input=1000, output=1000))
    assert cost == nano(Decimal("0.0025") + Decimal("0.01"))


def test_a_token_only_price_is_computed_without_genai_prices_arithmetic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("calc_price called for a token-only price")

    monkeypatch.setattr(ModelPrice, "calc_price", refuse)
    tokens = {"input": 1000, "output": 10, "cache_read": 2000}
    # claude-sonnet-4-5 has every token kind, 1-hour writes included
    record = rec("claude-sonnet-4-5", cache_creation_5m=100, cache_creation_1h=100, **tokens)
    assert PriceBook().cost(record) == nano(Decimal("0.004725"))


D = Decimal
# (what, the price's fields, whether the fast arithmetic takes it)
SHAPES = [
    (
        "every token kind and both searches",
        {
            "input_mtok": D(1), "output_mtok": D(2), "cache_read_mtok": D(3),
            "cache_write_mtok": D(4), "cache_write_1h_mtok": D(5),
            "web_searches_kcount": D(6), "storage_searches_kcount": D(7),
        },
        True,
    ),
    ("input and output only", {"input_mtok": D(1), "output_mtok": D(2)}, True),
    ("no output price", {"input_mtok": D(1)}, False),
    ("no input price", {"output_mtok": D(1)}, False),
    ("a 1-hour write without a write", {"input_mtok": D(1), "output_mtok": D(2), "cache_write_1h_mtok": D(3)}, False),
    ("an audio price", {"input_mtok": D(1), "output_mtok": D(2), "input_audio_mtok": D(3)}, False),
]  # fmt: skip


@pytest.mark.parametrize(("what", "fields", "fast"), SHAPES, ids=[s[0] for s in SHAPES])
def test_the_fast_arithmetic_takes_exactly_the_prices_of_token_kinds(
    what: str, fields: dict[str, Decimal], fast: bool
) -> None:
    assert (prices._tokens_only(ModelPrice(**fields)) is not None) is fast


# claude-sonnet-4-5: over 200k input tokens, cache reads and writes included: the long-context
# tier ($6 in, $7.50 5-minute write, $12 1-hour write, $0.60 read)
TIERS = [
    ("exactly 200k input: base price", {"input": 200_000}, "0.6"),
    ("one past 200k: the tier", {"input": 200_001}, "1.200006"),
    ("5-minute writes count", {"input": 150_000, "cache_creation_5m": 100_000}, "0.9+0.75"),
    ("1-hour writes count", {"input": 150_000, "cache_creation_1h": 100_000}, "0.9+1.2"),
    ("reads count", {"input": 150_000, "cache_read": 100_000}, "0.9+0.06"),
]


@pytest.mark.parametrize(("what", "tokens", "expected"), TIERS, ids=[t[0] for t in TIERS])
def test_the_tier_is_chosen_by_the_whole_input_cache_included(
    what: str, tokens: dict[str, int], expected: str
) -> None:
    amount = sum((Decimal(p) for p in expected.split("+")), Decimal(0))
    assert PriceBook().cost(rec("claude-sonnet-4-5", output=0, **tokens)) == nano(amount)


def test_a_tier_price_object_is_read_from_its_highest_tier_passed() -> None:
    price = TieredPrices(base=D(1), tiers=[Tier(start=10, price=D(2)), Tier(start=20, price=D(3))])
    assert [prices._at(price, n) for n in (0, 10, 11, 20, 21)] == [D(1), D(1), D(2), D(2), D(3)]


# --- budgets.py --------------------------------------------------------------------------

BERLIN = ZoneInfo("Europe/Berlin")
MONDAY = "2026-12-07T15:00:00"


def berlin(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def dollars(text: str) -> int:
    return nano(Decimal(text))


def budgets(clock: Clock, reservation: str = "0.10", **settings: Any) -> Budgets:
    spend = Spend(timezone="Europe/Berlin", reservation_usd=Decimal(reservation), **settings)
    return Budgets(spend, clock)


def held(b: Budgets, client: str) -> int:
    """What the client's own budget has reserved for its requests in flight."""
    accounts = {a.key: a for a, *_ in b.state(client)}
    return accounts["client", client].reserved


def test_the_budgets_keep_the_spend_section_they_were_built_from() -> None:
    spend = Spend(soft_percent=70)
    assert Budgets(spend).spend is spend


CAPPED = [
    ("a client", {"clients": (("alice", Budget(Decimal(1), Decimal(1), Decimal(1))),)}),
    ("a team", {"teams": (("ml", Budget(Decimal(1), Decimal(1), Decimal(1))),)}),
    ("the organisation", {"organisation": Budget(Decimal(1), Decimal(1), Decimal(1))}),
]


@pytest.mark.parametrize(("what", "settings"), CAPPED, ids=[c[0] for c in CAPPED])
def test_a_budget_that_caps_every_period_refuses_when_used(
    what: str, settings: dict[str, Any]
) -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, **settings)
    b.settle("alice", ("ml",), clock.now, dollars("1"))
    refusal = b.admit("alice", ("ml",))
    assert refusal is not None and "daily budget of" in refusal.message


# (costs of the client's records in order, what its next request reserves; the estimate is 0.10)
MEANS = [
    ("no record yet: the estimate", [], dollars("0.10")),
    ("one record: its cost", ["1"], dollars("1")),
    ("a cheaper one moves the mean an eighth of the way", ["1", "0.20"], dollars("0.90")),
    ("a dearer one too", ["1", "1.80"], dollars("1.10")),
    ("the eighth is floored", ["1", "0.999999997"], dollars("1") - 1),
    ("an unknown or free cost leaves the mean", ["1", None, "0"], dollars("1")),
    ("a mean below the estimate: the estimate", ["0.05"], dollars("0.10")),
]


@pytest.mark.parametrize(("what", "costs", "reserved"), MEANS, ids=[m[0] for m in MEANS])
def test_a_request_reserves_the_larger_of_the_estimate_and_the_clients_recent_mean(
    what: str, costs: list[str | None], reserved: int
) -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, clients=(("alice", Budget(day=Decimal(100))),))
    for cost in costs:
        b.settle("alice", (), clock.now, None if cost is None else dollars(cost))
    b.settle("bob", (), clock.now, dollars("7"))  # another client's records are its own
    assert b.admit("alice") is None
    assert held(b, "alice") == reserved


def test_a_new_client_reserves_nothing_when_the_estimate_is_zero() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, reservation="0", teams=(("ml", Budget(day=Decimal(1))),))
    assert b.admit("alice", ("ml",)) is None
    b.settle("bob", ("ml",), clock.now, dollars("1"))
    refusal = b.admit("carol", ("ml",))
    assert refusal is not None and "held by requests in flight" not in refusal.message


# (cost settled in nano-dollars, what the client's day, week and month then show)
CHARGES = [(None, (0, 0, 0)), (0, (0, 0, 0)), (1, (1, 1, 1)), (dollars("2"), (dollars("2"),) * 3)]


@pytest.mark.parametrize(("cost", "shown"), CHARGES)
def test_settling_charges_every_period_a_positive_cost_and_nothing_else(
    cost: int | None, shown: tuple[int, ...]
) -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, default=Budget(day=Decimal(10)))
    b.settle("alice", (), clock.now, cost)
    assert b.spent("client", "alice") == shown


def test_uncapped_budgets_still_count_what_was_spent() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, teams=(("ml", Budget()),), clients=(("alice", Budget()),))
    b.settle("alice", ("ml",), clock.now, dollars("3"))
    expected = (dollars("3"),) * 3
    assert b.spent("client", "alice") == b.spent("team", "ml") == b.spent(ORGANISATION) == expected
    assert b.spent("team", "nobody") == b.spent("client", "nobody") == (0, 0, 0)


def test_a_request_no_budget_caps_holds_no_reservation() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(
        clock,
        teams=(("ml", Budget(day=Decimal(1))),),
        clients=(("alice", Budget()),),
        reservation_timeout_s=60,
    )
    assert b.admit("alice") is None and b.admit("bob", ("other",)) is None
    assert [a.reserved for a in b.configured()] == [0, 0, 0]
    clock.now += 61
    assert b.expire() == 0


def test_the_nameless_client_counts_for_the_organisation_only() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, default=Budget(day=Decimal(1)), organisation=Budget(day=Decimal(5)))
    b.settle("", (), clock.now, dollars("2"))
    assert b.admit("") is None  # the default client budget is not the nameless one's
    assert b.spent("client", "") == (0, 0, 0)
    assert b.spent(ORGANISATION) == (dollars("2"),) * 3


def test_a_reservation_is_dropped_exactly_at_its_timeout() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, default=Budget(day=Decimal(1)), reservation_timeout_s=60)
    assert b.admit("alice") is None
    clock.now += 59
    assert b.expire() == 0
    clock.now += 1
    assert b.expire() == 1


def test_a_record_at_the_first_instant_of_a_day_counts_for_that_day() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, default=Budget(day=Decimal(1)))
    midnight = berlin("2026-12-08T00:00:00")
    clock.now = midnight  # the first call after midnight is a settle: it starts the new day
    b.settle("alice", (), midnight, dollars("1"))
    assert b.admit("alice") is not None


def test_a_record_from_yesterday_still_counts_for_this_week_and_month() -> None:
    clock = Clock(berlin("2026-12-09T00:00:05"))  # a Wednesday
    b = budgets(clock, default=Budget(day=Decimal(1)))
    b.settle("alice", (), berlin("2026-12-08T23:59:50"), dollars("5"))
    assert b.spent("client", "alice") == (0, dollars("5"), dollars("5"))


def test_a_new_day_starts_from_exactly_zero() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, default=Budget(day=Decimal(1)))
    b.settle("alice", (), clock.now, dollars("0.5"))
    clock.now = berlin("2026-12-08T09:00:00")
    assert b.admit("alice") is None
    assert b.spent("client", "alice") == (0, dollars("0.5"), dollars("0.5"))


def test_loaded_totals_set_each_budgets_period_and_unknown_teams_are_ignored() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(
        clock,
        teams=(("ml", Budget(week=Decimal(1))),),
        clients=(("alice", Budget(month=Decimal(1))),),
        organisation=Budget(day=Decimal(1)),
    )
    b.load(
        {
            ("team", "ml", Period.WEEK): 7,
            ("client", "alice", Period.MONTH): 8,
            ("client", "bob", Period.DAY): 9,
            (ORGANISATION, "", Period.DAY): 10,
            ("team", "gone", Period.DAY): 11,
        }
    )
    assert b.spent("team", "ml") == (0, 7, 0)
    assert b.spent("client", "alice") == (0, 0, 8)
    assert b.spent("client", "bob") == (9, 0, 0)
    assert b.spent(ORGANISATION) == (10, 0, 0)
    assert b.spent("team", "gone") == (0, 0, 0)


def test_loaded_totals_past_the_soft_threshold_report_it_for_their_period() -> None:
    seen: list[tuple[str, str, Period]] = []
    spend = Spend(teams=(("ml", Budget(week=Decimal(1))),), soft_percent=50)
    b = Budgets(spend, Clock(berlin(MONDAY)), on_soft=lambda *a: seen.append(a))
    b.load({("team", "ml", Period.WEEK): dollars("0.6")})
    assert seen == [("team", "ml", Period.WEEK)]


def test_the_configured_budgets_are_the_organisation_the_teams_and_the_named_clients() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(
        clock,
        teams=(("ml", Budget()), ("ops", Budget())),
        clients=(("alice", Budget(day=Decimal(1))),),
        default=Budget(day=Decimal(2)),
    )
    assert [a.key for a in b.configured()] == [
        (ORGANISATION, ""), ("team", "ml"), ("team", "ops"), ("client", "alice")
    ]  # fmt: skip
    b.settle("alice", (), clock.now, dollars("0.5"))
    list(b.configured())  # listing them again keeps what they hold
    assert b.spent("client", "alice") == (dollars("0.5"),) * 3


def test_the_state_uses_the_teams_given_else_the_ones_learnt_from_records() -> None:
    clock = Clock(berlin(MONDAY))
    b = budgets(clock, teams=(("ml", Budget(day=Decimal(1))),))
    b.settle("alice", ("ml",), clock.now, dollars("0.5"))
    assert [a.key for a, *_ in b.state("alice")] == [("team", "ml")]
    assert b.state("alice", ()) == []


def test_periods_start_over_even_for_a_clock_at_the_epoch() -> None:
    clock = Clock(0.5)
    b = Budgets(Spend(default=Budget(day=Decimal(1), week=Decimal(5), month=Decimal(5))), clock)
    b.settle("alice", (), 0.5, dollars("1"))
    clock.now = 2.0  # still the same day, week and month
    refusal = b.admit("alice")
    assert refusal is not None and "daily budget" in refusal.message
    assert b.spent("client", "alice") == (dollars("1"),) * 3


# (what, spent, cap, the warning at a soft threshold of 80%)
SOFT = [
    ("at the threshold", "8", "10", "the organisation is at 80% of its day budget: $8.00 of $10.00"),
    ("at the cap", "10", "10", "the organisation is at 100% of its day budget: $10.00 of $10.00"),
    ("a cap of one nano-dollar", "0.000000001", "0.000000001", "the organisation is at 100% of its day budget: $0.00 of $0.00"),
    # a percent a hair under a whole one is floored, even where a float would round it up
    ("a hair under 90% of $100M", "89999999.999999999", "100000000", "the organisation is at 89% of its day budget: $90000000.00 of $100000000.00"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "spent", "cap", "message"), SOFT, ids=[s[0] for s in SOFT])
def test_the_soft_threshold_warning_names_the_budget_its_percent_and_amounts(
    what: str, spent: str, cap: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    spend = Spend(organisation=Budget(day=Decimal(cap)), soft_percent=80)
    b = Budgets(spend, Clock(berlin(MONDAY)))
    with caplog.at_level(logging.WARNING, "extproc.spend"):
        b.settle("alice", (), berlin(MONDAY), dollars(spent))
    assert [r.getMessage() for r in caplog.records] == [message]


# --- periods.py --------------------------------------------------------------------------

# (zone, a moment there, period, its start and end there)
BOUNDS = [
    ("Europe/Berlin", "2026-12-09T15:37:42.250000", Period.DAY, "2026-12-09T00:00:00", "2026-12-10T00:00:00"),
    ("Europe/Berlin", "2026-12-09T15:37:42.250000", Period.WEEK, "2026-12-07T00:00:00", "2026-12-14T00:00:00"),
    ("Europe/Berlin", "2026-12-09T15:37:42.250000", Period.MONTH, "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
    ("Europe/Berlin", "2026-12-13T23:59:59", Period.WEEK, "2026-12-07T00:00:00", "2026-12-14T00:00:00"),
    ("Europe/Berlin", "2027-02-28T12:00:00", Period.MONTH, "2027-02-01T00:00:00", "2027-03-01T00:00:00"),
    ("Pacific/Auckland", "2026-12-09T00:30:00", Period.DAY, "2026-12-09T00:00:00", "2026-12-10T00:00:00"),
    ("America/Los_Angeles", "2026-12-09T23:30:00", Period.DAY, "2026-12-09T00:00:00", "2026-12-10T00:00:00"),
    ("Pacific/Auckland", "2026-12-01T00:30:00", Period.MONTH, "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
    ("America/Los_Angeles", "2026-11-30T23:30:00", Period.MONTH, "2026-11-01T00:00:00", "2026-12-01T00:00:00"),
]  # fmt: skip


@pytest.mark.parametrize(("zone", "moment", "period", "start", "end"), BOUNDS)
def test_a_period_runs_from_local_midnight_to_local_midnight(
    zone: str, moment: str, period: Period, start: str, end: str
) -> None:
    here = ZoneInfo(zone)

    def local(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=here).timestamp()

    assert Calendar(zone).bounds(period, local(moment)) == (local(start), local(end))


def test_a_day_whose_midnight_happens_twice_starts_at_the_first() -> None:
    # Havana leaves summer time at 01:00 on 2026-11-01: 00:00-00:59 is lived twice
    calendar = Calendar("America/Havana")
    second_pass = utc("2026-11-01T05:30:00")  # 00:30 the second time
    start, end = calendar.bounds(Period.DAY, second_pass)
    assert (start, end - start) == (utc("2026-11-01T04:00:00"), 25 * 3600)
    assert calendar.bounds(Period.DAY, utc("2026-11-01T04:30:00")) == (start, end)
