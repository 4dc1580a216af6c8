"""Spend's Prometheus metrics, in the processor's registry.

Labels are bounded: teams and models as configured or priced (at most
``MAX_LABELS`` distinct values each, the rest as ``other``), who paid, and the
budgets named in the config. Per-person figures come from the ledger and the
``spend`` command, never from labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from extproc.config.spend import Period
from extproc.spend.budgets import Budgets
from extproc.spend.prices import NANO_PER_USD
from extproc.usage.record import UsageRecord

MAX_LABELS = 100
OTHER = "other"


class _Bounded:
    """Keeps the first ``MAX_LABELS`` values of a label; later ones are ``other``."""

    def __init__(self, known: tuple[str, ...] = ()) -> None:
        self._seen = set(known)

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < MAX_LABELS:
            self._seen.add(value)
            return value
        return OTHER


class SpendMetrics:
    """The ``SpendSink`` the processor uses."""

    def __init__(self, registry: CollectorRegistry, teams: tuple[str, ...] = ()) -> None:
        self._registry = registry
        self._team = _Bounded(teams)
        self._model = _Bounded()
        self._budgets: Budgets | None = None
        self._dropped = 0
        self.cost = Counter(
            "gateway_spend_usd",
            "Cost of metered requests in USD by team (each of a request's teams), who paid "
            "(injected: charged to the organisation; client: API-equivalent, never charged) "
            "and model.",
            ["team", "paid_by", "model"],
            registry=registry,
        )
        self.unknown = Counter(
            "gateway_spend_unknown_cost_requests",
            "Metered requests whose cost is unknown (no price for the model, or no usage).",
            ["model"],
            registry=registry,
        )
        self.unknown_models = Counter(
            "gateway_spend_unknown_price_models",
            "Models seen without a price (each counted once per process).",
            registry=registry,
        )
        self.soft = Counter(
            "gateway_spend_soft_threshold_crossings",
            "Budgets that reached their soft threshold, by scope and period.",
            ["scope", "period"],
            registry=registry,
        )
        self.limit = self._gauge("gateway_spend_budget_limit_usd", "A configured budget's cap.")
        self.spent = self._gauge(
            "gateway_spend_budget_spent_usd", "Charged spend in a configured budget's period."
        )
        self.used = self._gauge(
            "gateway_spend_budget_used_ratio", "Spent plus reserved over the cap (1: exhausted)."
        )
        self.soft_ratio = Gauge(
            "gateway_spend_budget_soft_ratio",
            "The soft threshold as a fraction of each cap.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.written = Counter(
            "gateway_spend_ledger_rows_written", "Ledger rows written.", registry=registry
        )
        self.queued = Gauge(
            "gateway_spend_ledger_queued_rows",
            "Ledger rows waiting to be written.",
            registry=registry,
            multiprocess_mode="sum",
        )
        self.lag = Gauge(
            "gateway_spend_ledger_lag_seconds",
            "Age of the oldest ledger row not yet written.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.dropped = Counter(
            "gateway_spend_ledger_dropped_rows",
            "Ledger rows dropped because the queue was full while the database was down.",
            registry=registry,
        )
        self.up = Gauge(
            "gateway_spend_database_up",
            "1 while the spend database takes writes, 0 while it cannot be reached.",
            registry=registry,
            multiprocess_mode="min",
        )

    def _gauge(self, name: str, text: str) -> Gauge:
        return Gauge(
            name,
            text,
            ["scope", "name", "period"],
            registry=self._registry,
            multiprocess_mode="max",
        )

    def watch(self, budgets: Budgets) -> None:
        """Report ``budgets``' configured caps with each ledger flush."""
        self._budgets = budgets
        self.soft_ratio.set(budgets.spend.soft_percent / 100)

    def priced(self, record: UsageRecord, cost: int | None) -> None:
        model = self._model(record.model or "unknown")
        if cost is None:
            self.unknown.labels(model).inc()
            return
        if cost == 0:
            return  # nothing used (errors, refusals, count_tokens): no series for them
        usd = cost / NANO_PER_USD  # a float only here: Prometheus samples are floats
        for team in record.teams or ("",):
            self.cost.labels(self._team(team), record.credential_source, model).inc(usd)

    def unknown_price(self, model: str) -> None:
        self.unknown_models.inc()

    def soft_threshold(self, scope: str, name: str, period: Period) -> None:
        self.soft.labels(scope, period.value).inc()

    def ledger(self, written: int, queued: int, lag_s: float, dropped: int, up: bool) -> None:
        self.written.inc(written)
        self.queued.set(queued)
        self.lag.set(lag_s)
        if dropped > self._dropped:
            self.dropped.inc(dropped - self._dropped)
            self._dropped = dropped
        self.up.set(1 if up else 0)
        if self._budgets is not None:
            self._report_budgets(self._budgets)

    def _report_budgets(self, budgets: Budgets) -> None:
        for account in list(budgets.configured()):
            for i, cap in enumerate(account.caps):
                if cap is None:
                    continue
                labels = (account.scope, account.name, ("day", "week", "month")[i])
                self.limit.labels(*labels).set(cap / NANO_PER_USD)
                self.spent.labels(*labels).set(account.spent[i] / NANO_PER_USD)
                self.used.labels(*labels).set((account.spent[i] + account.reserved) / max(cap, 1))
