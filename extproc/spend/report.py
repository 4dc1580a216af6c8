"""What the ``spend`` command shows: totals for a period, and one client's budgets.

Read from the ledger only (the database the gateway writes), so it works while
the gateway runs, on any replica, and after a restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal

from extproc.config.spend import Period, Spend
from extproc.spend.budgets import Budgets
from extproc.spend.database import Database
from extproc.spend.periods import PERIODS
from extproc.spend.prices import usd

GROUPS = ("client", "team", "model", "paid_by")
_TOTALS = (
    "SELECT client, teams, model, paid_by, COUNT(*), SUM(COALESCE(input, 0)), "
    "SUM(COALESCE(output, 0)), SUM(COALESCE(cache_read, 0)), "
    "SUM(COALESCE(cache_write_5m, 0) + COALESCE(cache_write_1h, 0)), "
    "SUM(COALESCE(cost_nano, 0)), SUM(CASE WHEN cost_nano IS NULL THEN 1 ELSE 0 END) "
    "FROM ledger WHERE time >= ? AND time < ? GROUP BY client, teams, model, paid_by"
)


@dataclass
class Total:
    """One line: a client, team, model or payer and what it used; cost apart by who paid."""

    name: str
    requests: int = 0
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    charged_usd: Decimal = Decimal(0)  # the organisation's key paid: counts against budgets
    api_equivalent_usd: Decimal = Decimal(0)  # the client's own key or subscription: never charged
    unknown_cost: int = 0  # requests whose model had no price


def totals(db: Database, start: float, end: float, by: str) -> list[Total]:
    """Totals by ``by`` (one of GROUPS) over [start, end); a request counts for each team."""
    found: dict[str, Total] = {}
    for client, teams, model, paid_by, *numbers in db.execute(_TOTALS, (start, end)):
        names = {"client": [client], "model": [model], "paid_by": [paid_by]}
        names["team"] = [t for t in teams.split(",") if t] or [""]
        requests, tokens_in, tokens_out, read, write, cost, unknown = (int(n or 0) for n in numbers)
        for name in names[by]:
            total = found.setdefault(name, Total(name))
            total.requests += requests
            total.input += tokens_in
            total.output += tokens_out
            total.cache_read += read
            total.cache_write += write
            total.unknown_cost += unknown
            if paid_by == "injected":
                total.charged_usd += usd(cost)
            else:
                total.api_equivalent_usd += usd(cost)
    return sorted(found.values(), key=lambda t: (-(t.charged_usd + t.api_equivalent_usd), t.name))


@dataclass
class BudgetLine:
    budget: str  # "client 'alice'", "team 'ml'", "the organisation"
    period: Period
    cap_usd: Decimal
    used_usd: Decimal
    remaining_usd: Decimal
    resets: str  # ISO time in the configured zone


def client_budgets(
    spend: Spend, db: Database, client: str, now: float | None = None
) -> list[BudgetLine]:
    """Used and remaining of every budget ``client`` counts for, and when each resets."""
    at = time.time() if now is None else now
    budgets = Budgets(spend, lambda: at)
    budgets.load(db.sums({p: budgets.calendar.bounds(p, at)[0] for p in PERIODS}))
    teams = db.execute(
        "SELECT teams FROM ledger WHERE client = ? ORDER BY time DESC LIMIT 1", (client,)
    )
    names = tuple(t for t in (teams[0][0] if teams else "").split(",") if t)
    lines = []
    for account, i, period, cap in budgets.state(client, names):
        used = account.spent[i]
        lines.append(
            BudgetLine(
                account.label(),
                period,
                usd(cap),
                usd(used),
                usd(max(0, cap - used)),
                budgets.calendar.iso(budgets.ends[i]),
            )
        )
    return lines
