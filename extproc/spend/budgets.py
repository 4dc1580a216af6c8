"""Budgets in USD per client, per team and for the organisation, checked when a request starts.

``admit`` is on the per-request path: it reads in-memory integers (nano-dollars)
under one lock, never the database. A request it admits holds a reservation
against every budget it counts for; the usage record of that request settles
it (the oldest reservation of that client is released and the priced cost is
charged), and a reservation whose record never comes is dropped after
``reservation_timeout_s``.

The estimate a reservation holds is the larger of ``reservation_usd`` and the
client's recent mean cost (an exponential mean over its records). A request is
admitted while spent + reserved is below the cap, so the amount committed can
pass a cap by at most one estimate; spend passes it by at most that plus, for
each request admitted while close to the cap, what it cost beyond its estimate.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from extproc.config.spend import Budget, Period, Spend
from extproc.policy.limits import Refusal
from extproc.spend.periods import PERIODS, Calendar
from extproc.spend.prices import nano, usd

log = logging.getLogger("extproc.spend")
ORGANISATION = "organisation"
_MEAN_WEIGHT = 8  # the recent mean moves 1/8 of the way to each new cost
Key = tuple[str, str]  # (scope, name): ("client", "alice"), ("team", "ml"), ("organisation", "")
SoftHook = Callable[[str, str, Period], None]
_ADJECTIVE = {Period.DAY: "daily", Period.WEEK: "weekly", Period.MONTH: "monthly"}


def _caps(budget: Budget) -> tuple[int | None, ...]:
    values = (budget.day, budget.week, budget.month)
    return tuple(None if v is None else nano(v) for v in values)


@dataclass(slots=True)
class Account:
    """One budget's state: caps, spent in the current periods, reserved by requests in flight."""

    scope: str
    name: str
    caps: tuple[int | None, ...]
    spent: list[int] = field(default_factory=lambda: [0, 0, 0])
    reserved: int = 0
    soft_seen: list[bool] = field(default_factory=lambda: [False, False, False])
    capped: bool = False  # some period has a cap (set from ``caps``)

    def __post_init__(self) -> None:
        self.capped = any(c is not None for c in self.caps)

    @property
    def key(self) -> Key:
        return (self.scope, self.name)

    def label(self) -> str:
        return "the organisation" if self.scope == ORGANISATION else f"{self.scope} '{self.name}'"


@dataclass(frozen=True, slots=True)
class _Crossing:
    """A budget that passed its soft threshold: told after the lock is released."""

    account: Account
    i: int
    spent: int
    cap: int


@dataclass(slots=True)
class _Held:
    expires: float
    amount: int
    accounts: tuple[Account, ...]


class Budgets:
    """The budgets' in-memory state; safe to call from several threads."""

    def __init__(
        self,
        spend: Spend,
        clock: Callable[[], float] = time.time,
        on_soft: SoftHook | None = None,
    ) -> None:
        self.spend = spend
        self.calendar = Calendar(spend.timezone)
        self._clock = clock
        self._on_soft = on_soft
        self._lock = threading.Lock()
        self._soft = spend.soft_percent
        self._estimate = nano(spend.reservation_usd)
        self._timeout = spend.reservation_timeout_s
        self._default = _caps(spend.default)
        self._client_caps = {name: _caps(b) for name, b in spend.clients}
        self._org = Account(ORGANISATION, "", _caps(spend.organisation))
        self._teams = {name: Account("team", name, _caps(b)) for name, b in spend.teams}
        self._clients: dict[str, Account] = {}
        self._held: dict[str, deque[_Held]] = {}
        self._means: dict[str, int] = {}
        self._client_teams: dict[str, tuple[str, ...]] = {}
        self.starts = [0.0, 0.0, 0.0]
        self.ends = [0.0, 0.0, 0.0]
        self._next = 0.0
        self._roll(clock())

    @property
    def any(self) -> bool:
        """Some budget has a cap: requests on the organisation's key are checked."""
        accounts = (self._org, *self._teams.values())
        caps = (self._default, *self._client_caps.values(), *(a.caps for a in accounts))
        return any(c is not None for cap in caps for c in cap)

    def admit(self, client: str, teams: tuple[str, ...] = ()) -> Refusal | None:
        """None to go on (a reservation is then held), or the 429 naming the budget."""
        with self._lock:
            now = self._clock()
            if now >= self._next:
                self._roll(now)
            accounts = self._accounts(client, teams or self._client_teams.get(client, ()))
            if not accounts:
                return None
            for account in accounts:
                for i, cap in enumerate(account.caps):
                    if cap is not None and account.spent[i] + account.reserved >= cap:
                        return self._refusal(account, i, cap, now)
            amount = max(self._estimate, self._means.get(client, 0))
            for account in accounts:
                account.reserved += amount
            held = self._held.get(client)
            if held is None:
                held = self._held[client] = deque()
            held.append(_Held(now + self._timeout, amount, accounts))
            return None

    def settle(self, client: str, teams: tuple[str, ...], at: float, cost: int | None) -> None:
        """A charged record arrived: release its reservation and charge ``cost`` (None: unknown)."""
        with self._lock:
            now = self._clock()
            if now >= self._next:
                self._roll(now)
            self._client_teams[client] = teams
            held = self._held.get(client)
            if held:
                self._release(held.popleft())
            if cost is None or cost <= 0:
                return
            mean = self._means.get(client, cost)
            self._means[client] = mean + (cost - mean) // _MEAN_WEIGHT
            crossed = self._charge(self._accounts(client, teams, every=True), at, cost)
        self._tell(crossed)

    def expire(self) -> int:
        """Drop reservations whose record never came; returns how many."""
        dropped = 0
        with self._lock:
            now = self._clock()
            for held in self._held.values():
                while held and held[0].expires <= now:
                    self._release(held.popleft())
                    dropped += 1
        return dropped

    def load(self, totals: Mapping[tuple[str, str, Period], int]) -> None:
        """Set spent in the current periods (from the database) for every configured budget."""
        crossed: list[_Crossing] = []
        with self._lock:
            for (scope, name, period), amount in totals.items():
                account = self._account(scope, name, create=True)
                if account is not None:
                    account.spent[PERIODS.index(period)] = amount
                    crossed += self._check_soft(account, PERIODS.index(period))
        self._tell(crossed)

    def totals(self) -> dict[tuple[str, str, Period], int]:
        """Spent in the current periods of every account (what a reload carries over)."""
        with self._lock:
            now = self._clock()
            if now >= self._next:
                self._roll(now)
            accounts = (self._org, *self._teams.values(), *self._clients.values())
            return {
                (a.scope, a.name, period): a.spent[i]
                for a in accounts
                for i, period in enumerate(PERIODS)
                if a.spent[i]
            }

    def state(
        self, client: str, teams: tuple[str, ...] | None = None
    ) -> list[tuple[Account, int, Period, int]]:
        """For one client: (budget, period index, period, cap) of every budget it counts for."""
        with self._lock:
            known = self._client_teams.get(client, ()) if teams is None else teams
            accounts = self._accounts(client, known, every=True)
            return [
                (a, i, PERIODS[i], cap)
                for a in accounts
                for i, cap in enumerate(a.caps)
                if cap is not None
            ]

    def spent(self, scope: str, name: str = "") -> tuple[int, ...]:
        """Spent in the current day, week and month (nano-dollars) of one budget's account."""
        with self._lock:
            account = self._account(scope, name, create=False)
            return tuple(account.spent) if account else (0, 0, 0)

    def configured(self) -> Iterable[Account]:
        """The budgets named in the config (bounded: these get gauges)."""
        yield self._org
        yield from self._teams.values()
        for name in self._client_caps:
            account = self._account("client", name, create=True)
            if account is not None:
                yield account

    def _accounts(
        self, client: str, teams: tuple[str, ...], every: bool = False
    ) -> tuple[Account, ...]:
        found = []
        mine = self._clients.get(client) or self._account("client", client, create=True)
        if client and mine is not None and (every or mine.capped):
            found.append(mine)
        for team in teams:
            account = self._teams.get(team)
            if account is not None and (every or account.capped):
                found.append(account)
        if every or self._org.capped:
            found.append(self._org)
        return tuple(found)

    def _account(self, scope: str, name: str, create: bool) -> Account | None:
        if scope == ORGANISATION:
            return self._org
        if scope == "team":
            return self._teams.get(name)
        account = self._clients.get(name)
        if account is None and create:
            caps = self._client_caps.get(name, self._default)
            account = self._clients[name] = Account("client", name, caps)
        return account

    def _release(self, held: _Held) -> None:
        for account in held.accounts:
            account.reserved -= held.amount

    def _charge(self, accounts: tuple[Account, ...], at: float, cost: int) -> list[_Crossing]:
        crossed: list[_Crossing] = []
        for i in range(3):
            if at < self.starts[i]:
                continue  # a record from a period already over: it is in the ledger only
            for account in accounts:
                account.spent[i] += cost
                crossed += self._check_soft(account, i)
        return crossed

    def _check_soft(self, account: Account, i: int) -> list[_Crossing]:
        """The crossing to tell (once per period), if ``account`` just passed its threshold."""
        cap = account.caps[i]
        if cap is None or account.soft_seen[i] or account.spent[i] * 100 < cap * self._soft:
            return []
        account.soft_seen[i] = True
        return [_Crossing(account, i, account.spent[i], cap)]

    def _tell(self, crossed: list[_Crossing]) -> None:
        """Log and report crossings outside the lock: ``admit`` never waits for a log handler."""
        for c in crossed:
            period = PERIODS[c.i]
            log.warning(
                "%s is at %d%% of its %s budget: $%s of $%s",
                c.account.label(), c.spent * 100 // max(c.cap, 1), period.value,
                _money(c.spent), _money(c.cap),
            )  # fmt: skip
            if self._on_soft is not None:
                self._on_soft(c.account.scope, c.account.name, period)

    def _roll(self, now: float) -> None:
        """A period ended: its spend starts again from zero (the ledger keeps the old one)."""
        for i, period in enumerate(PERIODS):
            if now < self.ends[i]:
                continue
            self.starts[i], self.ends[i] = self.calendar.bounds(period, now)
            for account in (self._org, *self._teams.values(), *self._clients.values()):
                account.spent[i] = 0
                account.soft_seen[i] = False
        self._next = min(self.ends)

    def _refusal(self, account: Account, i: int, cap: int, now: float) -> Refusal:
        period = PERIODS[i]
        resets = self.ends[i]
        message = (
            f"The {_ADJECTIVE[period]} budget of {account.label()} is used up: "
            f"${_money(account.spent[i])} spent of ${_money(cap)}"
            + (
                f" (${_money(account.reserved)} held by requests in flight)"
                if account.reserved
                else ""
            )
            + f". It resets at {self.calendar.iso(resets)}."
        )
        return Refusal(429, "budget", max(1, math.ceil(resets - now)), message)


def _money(amount: int) -> str:
    return f"{usd(amount):.2f}"
