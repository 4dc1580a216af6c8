"""What a usage record cost, in integer nano-dollars (1e-9 USD), never a float.

Prices come from the YAML's overrides first (negotiated or private models),
then from ``genai-prices``' bundled table (providers, models, price history and
long-context tiers). Only the bundled table is read: nothing here fetches
prices at run time. A model neither knows is an unknown cost (None), reported
once per model, never zero.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

from genai_prices import Usage
from genai_prices.data_snapshot import DataSnapshot, get_snapshot
from genai_prices.types import ModelPrice, TieredPrices

from extproc.config.spend import Price
from extproc.spend.version import table_version
from extproc.usage.record import UsageRecord

log = logging.getLogger("extproc.spend")
NANO_PER_USD = 10**9
_MTOK = Decimal(10**6)


class Pricer(Protocol):
    def __call__(self, record: UsageRecord) -> Decimal | None: ...


def nano(usd: Decimal) -> int:
    """USD as whole nano-dollars, rounded half to even (exact for prices to 1e-3 $/MTok)."""
    return int((usd * NANO_PER_USD).to_integral_value(ROUND_HALF_EVEN))


def usd(nano_usd: int) -> Decimal:
    return Decimal(nano_usd) / NANO_PER_USD


class PriceBook:
    """Prices records; the lookup of each model is done once and kept."""

    def __init__(
        self,
        overrides: tuple[tuple[str, Price], ...] = (),
        on_unknown: Callable[[str], None] | None = None,
    ) -> None:
        self._overrides = dict(overrides)
        self._pricers: dict[str, Pricer | None] = {}
        self._on_unknown = on_unknown
        self.version = table_version(overrides)
        # Loaded now (~13 ms, at start or reload), not by the first record's lookup, which
        # runs on the server's event loop in the access-log handler.
        self._table = get_snapshot()

    def cost(self, record: UsageRecord) -> int | None:
        """Nano-dollars; 0 for an answer that used nothing; None when the cost is unknown."""
        if not record.known:
            # Nothing billable was reported (an error, count_tokens, the models list): nothing
            # was used. A success that named its model but no tokens: the count was lost.
            return None if record.model and 200 <= record.status < 300 else 0
        pricer = self._pricer(record.model)
        if pricer is None:
            return None
        amount = pricer(record)
        return None if amount is None else nano(amount)

    def _pricer(self, model: str) -> Pricer | None:
        if model in self._pricers:
            return self._pricers[model]
        override = self._overrides.get(model)
        pricer = _flat(override) if override else _from_table(self._table, model)
        self._pricers[model] = pricer
        if pricer is None:
            log.warning("no price for model %r: its cost is counted as unknown", model[:80])
            if self._on_unknown is not None:
                self._on_unknown(model)
        return pricer


def _flat(price: Price) -> Pricer:
    def cost(record: UsageRecord) -> Decimal | None:
        total = Decimal(0)
        for tokens, per_mtok in (
            (record.input, price.input),
            (record.output, price.output),
            (record.cache_read, price.cache_read),
            (record.cache_creation_5m, price.cache_write_5m),
            (record.cache_creation_1h, price.cache_write_1h),
        ):
            if tokens:
                if per_mtok is None:
                    return None  # tokens of a kind this model has no price for
                total += tokens * per_mtok / _MTOK
        return total

    return cost


def _from_table(table: DataSnapshot, model: str) -> Pricer | None:
    if not model:
        return None
    try:
        _, info = table.find_provider_model(model, None, None, None)
    except LookupError:
        return None
    fast: dict[int, Pricer | None] = {}  # by the table's price object (a new one when it changes)

    def cost(record: UsageRecord) -> Decimal | None:
        at = datetime.fromtimestamp(record.time, UTC)
        try:  # the price in force when the request was made
            price = info.get_prices(at)
            key = id(price)
            if key not in fast:
                fast[key] = _tokens_only(price)
            quick = fast[key]
            if quick is not None:
                return quick(record)
            return price.calc_price(_usage(record))["total_price"]
        except (LookupError, ValueError):
            return None

    return cost


# Prices for usage a record never reports (searches): zero for every record.
_UNUSED = frozenset({"web_searches_kcount", "storage_searches_kcount"})
_TOKENS = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
)


def _tokens_only(price: ModelPrice) -> Pricer | None:
    """The same arithmetic as genai-prices' ``calc_price`` for a price of token kinds only
    (about 10x faster); None for any other price, which goes through ``calc_price``.

    As there, a token kind without a price of its own is priced as its parent (an unpriced
    cache read or write as input, an unpriced 1-hour write as a write), and a tiered price
    is chosen by the request's whole input (cache included).
    """
    given = {k for k, v in vars(price).items() if v is not None}
    if not given <= _UNUSED | set(_TOKENS):
        return None
    ins, out, read, write, hour = (getattr(price, k, None) for k in _TOKENS)
    if ins is None or out is None or (hour is not None and write is None):
        return None

    def cost(record: UsageRecord) -> Decimal:
        tokens_in, cached = record.input or 0, record.cache_read or 0
        five, long = record.cache_creation_5m or 0, record.cache_creation_1h or 0
        total = tokens_in + cached + five + long
        if read is None:
            tokens_in, cached = tokens_in + cached, 0
        if write is None:
            tokens_in, five, long = tokens_in + five + long, 0, 0
        elif hour is None:
            five, long = five + long, 0
        amount = _at(ins, total) * tokens_in + _at(out, total) * (record.output or 0)
        for per_mtok, count in ((read, cached), (write, five), (hour, long)):
            if count:
                assert per_mtok is not None
                amount += _at(per_mtok, total) * count
        return amount / _MTOK

    return cost


def _at(price: Decimal | TieredPrices, total_input: int) -> Decimal:
    if isinstance(price, Decimal):
        return price
    for tier in reversed(price.tiers):
        if total_input > tier.start:
            return tier.price
    return price.base


def _usage(record: UsageRecord) -> Usage:
    """genai-prices counts every input token in ``input_tokens``; the record counts kinds apart."""
    read, five, hour = (
        record.cache_read or 0,
        record.cache_creation_5m or 0,
        record.cache_creation_1h or 0,
    )
    return Usage(
        input_tokens=(record.input or 0) + read + five + hour,
        output_tokens=record.output or 0,
        cache_read_tokens=read,
        cache_write_tokens=five + hour,
        cache_write_5m_tokens=five,
        cache_write_1h_tokens=hour,
    )
