"""The ``spend`` section: prices, budgets in USD over calendar periods, and the ledger's store.

Parsed apart from the rest of the YAML (like ``limits``): money is its own
concern. Amounts are read as ``Decimal`` from the YAML text, never kept as
floats; every bad field is reported at once with its file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from enum import Enum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from extproc.config import fields, model
from extproc.config.sections import Problems, Section

SPEND = fields.SPEND.names
_BUDGETS = fields.BUDGETS.names
_BUDGET = fields.BUDGET.names
_PRICE = fields.PRICE.names
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")  # client and team names, as in keys
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,79}$")
# Host, port, database and user only: a password goes in ``password`` (a secret), never the URL.
_STORE = re.compile(
    r"^(sqlite|postgresql://([A-Za-z0-9_.-]+@)?[A-Za-z0-9.-]+(:[0-9]{1,5})?/[A-Za-z0-9_]+)$"
)
_MAX_USD = Decimal(10**9)
_NANO = Decimal("1e-9")


class Period(Enum):
    """A calendar period in the configured time zone; weeks start on Monday (ISO 8601)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"


@dataclass(frozen=True)
class Budget:
    """Hard caps in USD per period; None: no cap for that period."""

    day: Decimal | None = None
    week: Decimal | None = None
    month: Decimal | None = None

    def caps(self) -> tuple[tuple[Period, Decimal], ...]:
        values = ((Period.DAY, self.day), (Period.WEEK, self.week), (Period.MONTH, self.month))
        return tuple((p, v) for p, v in values if v is not None)


@dataclass(frozen=True)
class Price:
    """USD per million tokens; a cache price left out makes such tokens' cost unknown."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None


@dataclass(frozen=True)
class Spend:
    timezone: str = "UTC"
    store: str = "sqlite"  # or postgresql://[user@]host[:port]/db (shared by replicas)
    password: model.SecretRef | None = None
    state_dir: Path = Path("state")  # the SQLite file is state_dir/spend.db
    retention_days: int = 400
    flush_ms: int = 1000  # how often the ledger is written (and shared counters read)
    on_store_error: model.StoreFailure = model.StoreFailure.OPEN
    reservation_usd: Decimal = Decimal("0.50")  # held per request until its record arrives
    reservation_timeout_s: int = 900  # a reservation with no record is dropped after this
    soft_percent: int = 80
    prices: tuple[tuple[str, Price], ...] = ()
    organisation: Budget = Budget()
    default: Budget = Budget()  # every client without its own block
    clients: tuple[tuple[str, Budget], ...] = ()  # merged over ``default`` field by field
    teams: tuple[tuple[str, Budget], ...] = ()

    @property
    def shared(self) -> bool:
        return self.store != "sqlite"

    @property
    def sqlite_file(self) -> Path:
        return self.state_dir / "spend.db"


def spend(
    s: Section | None, problems: Problems, secret: Any, base: Path, metering: bool
) -> Spend | None:
    """``spend`` as a model; None if absent or invalid (problems say why)."""
    if s is None or not s.ok:
        return None
    bad = False
    timezone = s.text("timezone", "UTC")
    if timezone is not None and not _zone(timezone):
        s.error("timezone", "expected an IANA time zone name like UTC or Europe/Berlin")
        timezone = None
    store = s.text("store", "sqlite")
    if store is not None and not _STORE.match(store):
        s.error("store", "expected sqlite or postgresql://[user@]host[:port]/database")
        store = None
    password = secret(s.section("password", ["env", "file"])) if s.has("password") else None
    if s.has("password") and store == "sqlite":
        s.error("password", "only a postgresql store takes a password")
        bad = True
    bad = bad or (s.has("password") and password is None)
    state_dir = s.text("state_dir", "state")
    values = {
        "retention_days": fields.SPEND.integer(s, "retention_days"),
        "flush_ms": fields.SPEND.integer(s, "flush_ms"),
        "on_store_error": s.choice("on_store_error", model.StoreFailure, model.StoreFailure.OPEN),
        "reservation_usd": _money(s, "reservation_usd", Decimal("0.50")),
        "reservation_timeout_s": fields.SPEND.integer(s, "reservation_timeout_s"),
        "soft_percent": fields.SPEND.integer(s, "soft_percent"),
    }
    prices = _prices(s, problems)
    budgets = _budgets(s.section("budgets", _BUDGETS), problems)
    if not metering and budgets is not None and _any_budget(budgets):
        s.error(None, "budgets need metering: true (spend is priced from usage records)")
        bad = True
    if bad or None in (timezone, store, state_dir, prices, budgets, *values.values()):
        return None
    assert budgets is not None and prices is not None
    organisation, default, clients, teams = budgets
    return Spend(
        timezone, store, password, base / state_dir, prices=prices, organisation=organisation,
        default=default, clients=clients, teams=teams, **values,
    )  # fmt: skip


def _zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _money(s: Section, key: str, default: Decimal | None) -> Decimal | None:
    """A USD amount (0 … 1e9, at most nine decimals), read exactly from the YAML's text."""
    if key not in s.raw:
        return default
    value = _decimal(s.raw[key])
    if value is None or not 0 <= value <= _MAX_USD or value != value.quantize(_NANO):
        s.error(key, "expected an amount in USD between 0 and 1000000000, e.g. 25 or 0.5")
        return None
    return value


def _decimal(raw: Any) -> Decimal | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:  # repr of a YAML float is the shortest text that reads back as it: 0.3, not 0.299…
        value = Decimal(repr(raw) if isinstance(raw, float) else str(raw))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _prices(s: Section, problems: Problems) -> tuple[tuple[str, Price], ...] | None:
    found: list[tuple[str, Price]] = []
    bad = False
    for name, block in _named(s, "prices", _MODEL, "a model name"):
        p = Section(problems, (*s.path, "prices", name), block, _PRICE)
        if not p.ok:
            bad = True
            continue
        for key in ("input", "output"):
            if key not in p.raw:
                p.error(None, f"missing required field {key!r}")
        amounts = {key: _money(p, key, None) for key in _PRICE}
        if any(amounts[k] is None for k in p.raw if k in _PRICE) or None in (
            amounts["input"],
            amounts["output"],
        ):
            bad = True
            continue
        found.append((name, Price(**amounts)))  # type: ignore[arg-type]
    return None if bad or not _named_ok(s, "prices") else tuple(found)


_Budgets = tuple[Budget, Budget, tuple[tuple[str, Budget], ...], tuple[tuple[str, Budget], ...]]


def _budgets(s: Section | None, problems: Problems) -> _Budgets | None:
    if s is None:
        return Budget(), Budget(), (), ()
    if not s.ok:
        return None
    organisation = budget(s.section("organisation", _BUDGET), Budget())
    default = budget(s.section("default", _BUDGET), Budget())
    clients = _named_budgets(s, problems, "clients", default or Budget())
    teams = _named_budgets(s, problems, "teams", Budget())
    if organisation is None or default is None or clients is None or teams is None:
        return None
    return organisation, default, clients, teams


def _named_budgets(
    s: Section, problems: Problems, key: str, base: Budget
) -> tuple[tuple[str, Budget], ...] | None:
    found: list[tuple[str, Budget]] = []
    bad = not _named_ok(s, key)
    for name, block in _named(s, key, _NAME, "a client or team name as in the keys file"):
        merged = budget(Section(problems, (*s.path, key, name), block, _BUDGET), base)
        bad = bad or merged is None
        if merged is not None:
            found.append((name, merged))
    return None if bad else tuple(found)


def budget(s: Section | None, base: Budget) -> Budget | None:
    """One budget block merged over ``base``; ``null`` for a period lifts the base's cap."""
    if s is None:
        return base
    if not s.ok:
        return None
    values: dict[str, Decimal | None] = {}
    ok = True
    for key in _BUDGET:
        if key in s.raw:
            values[key] = None if s.raw[key] is None else _money(s, key, None)
            ok = ok and (s.raw[key] is None or values[key] is not None)
    return replace(base, **values) if ok else None


def _named(s: Section, key: str, pattern: re.Pattern[str], what: str) -> list[tuple[str, Any]]:
    raw = s.raw.get(key)
    if not isinstance(raw, dict):
        return []
    out = []
    for name, block in raw.items():
        if not isinstance(name, str) or not pattern.match(name):
            s.error(key, f"{str(name)[:64]!r} is not {what}")
            continue
        out.append((name, block))
    return out


def _named_ok(s: Section, key: str) -> bool:
    """The field is absent or a mapping whose names are all valid (reported otherwise)."""
    if key not in s.raw:
        return True
    raw = s.raw[key]
    if not isinstance(raw, dict):
        s.error(key, "expected a mapping of names to blocks")
        return False
    pattern = _MODEL if key == "prices" else _NAME
    return all(isinstance(n, str) and pattern.match(n) for n in raw)


def _any_budget(budgets: _Budgets) -> bool:
    organisation, default, clients, teams = budgets
    blocks = [organisation, default, *(b for _, b in clients), *(b for _, b in teams)]
    return any(b.caps() for b in blocks)
