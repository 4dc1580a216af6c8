"""Spend as the processor runs it: records in, priced, charged to budgets, written in batches.

``records`` is called with each batch of usage records (off the request path):
it prices them, settles their reservations and charges the budgets in memory,
then queues the ledger rows. A writer thread flushes the queue every
``flush_ms`` in one transaction, with the budget counters; where others write
them too (workers on one SQLite file, replicas on PostgreSQL) it then reads
the counters back, on every flush.

Loss: rows still queued when the process is killed (at most ``flush_ms`` of
records) and records Envoy had not sent yet. While the database is down, rows
wait in memory up to ``MAX_QUEUED`` (more are dropped and counted) and are
written when it is back; budgets keep counting in memory and, with
``on_store_error: closed``, refuse requests on the organisation's key (503).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from prometheus_client import CollectorRegistry

from extproc.config.model import GatewayConfig, StoreFailure
from extproc.config.spend import Period, Spend
from extproc.policy.limits import Refusal
from extproc.policy.secrets import SecretError, read_secret
from extproc.spend.budgets import Budgets
from extproc.spend.database import (
    CounterKey,
    Database,
    DatabaseError,
    PostgresDatabase,
    Row,
    SqliteDatabase,
    Totals,
    budget_keys,
)
from extproc.spend.metrics import SpendMetrics
from extproc.spend.periods import PERIODS
from extproc.spend.prices import PriceBook
from extproc.usage.record import UsageRecord

log = logging.getLogger("extproc.spend")
MAX_QUEUED = 100_000
# What a reload leaves as it is in a running processor until a restart (docs/configuration.md).
KEPT_UNTIL_RESTART = ("store", "state_dir", "timezone", "password")
_PRUNE_EVERY_S = 3600.0
_DOWN = Refusal(503, "budget_store", 5, "Budgets cannot be checked right now; retry shortly.")


class SpendSink(Protocol):
    """What spend reports (the processor's Prometheus metrics)."""

    def watch(self, budgets: Budgets) -> None: ...

    def priced(self, record: UsageRecord, cost: int | None) -> None: ...

    def unknown_price(self, model: str) -> None: ...

    def soft_threshold(self, scope: str, name: str, period: Period) -> None: ...

    def ledger(self, written: int, queued: int, lag_s: float, dropped: int, up: bool) -> None: ...


def open_database(spend: Spend, environ: Mapping[str, str] = os.environ) -> Database:
    """The configured database, its schema upgraded; raises DatabaseError naming it
    (SecretError naming the password's source)."""
    if not spend.shared:
        return SqliteDatabase(spend.sqlite_file)
    secret = read_secret(spend.password, environ) if spend.password else None
    try:
        password = secret.reveal().decode() if secret else None
    except UnicodeDecodeError:  # its message would quote a byte of the password
        assert spend.password is not None
        raise SecretError(f"{spend.password.describe()} is not UTF-8 text") from None
    return PostgresDatabase(spend.store, password)


def spend_for(
    config: GatewayConfig, registry: CollectorRegistry, environ: Mapping[str, str] = os.environ
) -> SpendService | None:
    """The running spend service for ``config`` (None without a ``spend`` section).

    Raises DatabaseError (naming the database, never a password) when it cannot be opened.
    """
    spend = config.spend
    if spend is None:
        return None
    metrics = SpendMetrics(registry, tuple(name for name, _ in spend.teams))
    shared = spend.shared or config.extproc.workers > 1
    service = SpendService(spend, open_database(spend, environ), metrics, shared=shared)
    service.start()
    return service


class SpendService:
    """The ``RecordSink`` for spend, and the budgets' ``admit`` for the processor."""

    def __init__(
        self,
        spend: Spend,
        database: Database,
        sink: SpendSink | None = None,
        clock: Callable[[], float] = time.time,
        shared: bool | None = None,
    ) -> None:
        self.spend = spend
        self._db = database
        # Others write the same counters (replicas on PostgreSQL, workers on one SQLite file):
        # read them after every flush. Alone, this process's own counts are the whole truth.
        self._shared = spend.shared if shared is None else shared
        self._sink = sink
        self._clock = clock
        self.prices = PriceBook(spend.prices, sink.unknown_price if sink else None)
        self.budgets = Budgets(spend, clock, sink.soft_threshold if sink else None)
        self._lock = threading.Lock()
        self._flushing = threading.RLock()  # a flush (which may refresh) or a refresh
        self._queue: deque[tuple[Row, dict[CounterKey, int]]] = deque()
        self._pending: dict[CounterKey, int] = {}  # charged, not yet written
        self._dropped = 0
        self._written = 0
        self.healthy = True
        self._refuse_when_down = spend.on_store_error is StoreFailure.CLOSED
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pruned = 0.0
        self._bounds: dict[Period, tuple[float, float]] = {}
        self.budgets.load(database.rebuild(self._starts()))
        if sink is not None:
            sink.watch(self.budgets)

    def reconfigure(self, spend: Spend | None) -> None:
        """A reloaded config: new budgets, prices and thresholds take effect now.

        The budgets are rebuilt from the counters (plus what is not yet written);
        reservations of requests in flight are dropped with the old budgets. The
        store, state directory and time zone stay as they are until a restart.
        """
        if spend is None or spend == self.spend:
            return
        kept = {name: getattr(self.spend, name) for name in KEPT_UNTIL_RESTART}
        if {name: getattr(spend, name) for name in KEPT_UNTIL_RESTART} != kept:
            log.warning("spend: store, state_dir and timezone changes take effect at restart")
            spend = replace(spend, **kept)
        sink = self._sink
        budgets = Budgets(spend, self._clock, sink.soft_threshold if sink else None)
        if spend.prices != self.spend.prices:
            self.prices = PriceBook(spend.prices, sink.unknown_price if sink else None)
        self.spend = spend
        self._refuse_when_down = spend.on_store_error is StoreFailure.CLOSED
        budgets.load(self.budgets.totals())  # what is known now, kept if the read fails
        self.refresh(budgets)  # spent loaded before it serves: admit never sees it empty
        self.budgets = budgets  # one reference swap: admit uses the old or the new, whole
        if sink is not None:
            sink.watch(budgets)
        log.info("spend: budgets reloaded")

    def admit(self, client: str, teams: tuple[str, ...] = ()) -> Refusal | None:
        if not self.healthy and self._refuse_when_down:
            return _DOWN
        return self.budgets.admit(client, teams)

    def records(self, batch: Sequence[UsageRecord]) -> None:
        """Price, charge and queue one batch of records."""
        for record in batch:
            cost = self.prices.cost(record)
            if record.charged:
                self.budgets.settle(record.client, record.teams, record.time, cost)
            counters = self._counters(record, cost)
            with self._lock:
                if len(self._queue) >= MAX_QUEUED:
                    self._dropped += 1
                else:
                    self._queue.append((_row(record, cost), counters))
                    for key, amount in counters.items():
                        self._pending[key] = self._pending.get(key, 0) + amount
            if self._sink is not None:
                self._sink.priced(record, cost)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spend-ledger", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the writer after a last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        self._db.close()

    def flush(self) -> int:
        """Write what is queued in one transaction; returns the rows written (0 if down).

        One flush at a time (the writer's, or the last one at ``close``), and never beside
        a ``refresh``: counters read between a batch's commit and its leaving ``_pending``
        would count it twice.
        """
        with self._flushing:
            return self._flush()

    def _flush(self) -> int:
        with self._lock:
            batch = list(self._queue)
        if not batch:
            if self._shared:
                self.refresh()  # an idle replica or worker still sees the others' spend
            self._report(0)
            return 0
        merged: dict[CounterKey, int] = {}
        for _, counters in batch:
            for key, amount in counters.items():
                merged[key] = merged.get(key, 0) + amount
        try:
            self._db.write([row for row, _ in batch], merged)
        except DatabaseError as exc:
            self._down(exc)
            return 0
        with self._lock:
            for _ in batch:
                self._queue.popleft()
            for key, amount in merged.items():
                left = self._pending[key] - amount
                if left:
                    self._pending[key] = left
                else:
                    del self._pending[key]  # keys of past periods never pile up
        self._written += len(batch)
        self._up()
        if self._shared:
            self.refresh()  # other replicas' or workers' spend, from the shared counters
        self._report(len(batch))
        return len(batch)

    def refresh(self, budgets: Budgets | None = None) -> None:
        """``budgets`` (the served ones by default) from the shared counters (every
        replica's writes) plus what is still queued."""
        with self._flushing:
            self._refresh(budgets)

    def _refresh(self, budgets: Budgets | None) -> None:
        try:
            starts = self._starts()
            totals = self._db.counters(starts)
        except DatabaseError as exc:
            self._down(exc)
            return
        current = {(p.value, start): p for p, start in starts.items()}
        with self._lock:
            merged: Totals = dict(totals)
            for (scope, name, period, start), amount in self._pending.items():
                kind = current.get((period, start))
                if kind is not None and amount:  # only what counts in the current periods
                    merged[(scope, name, kind)] = merged.get((scope, name, kind), 0) + amount
            (self.budgets if budgets is None else budgets).load(merged)

    def _run(self) -> None:
        interval = self.spend.flush_ms / 1000
        while not self._stop.wait(interval):
            self.flush()
            self.budgets.expire()
            now = self._clock()
            if now - self._pruned >= _PRUNE_EVERY_S:
                self._prune(now)

    def _prune(self, now: float) -> None:
        try:
            gone = self._db.prune(now - self.spend.retention_days * 86400)
        except DatabaseError as exc:
            self._down(exc)
            return
        self._pruned = now
        if gone:
            log.info(
                "ledger: %d rows past the %d-day retention removed", gone, self.spend.retention_days
            )

    def _starts(self) -> dict[Period, float]:
        now = self._clock()
        return {p: self.budgets.calendar.bounds(p, now)[0] for p in PERIODS}

    def _counters(self, record: UsageRecord, cost: int | None) -> dict[CounterKey, int]:
        if not record.charged or not cost or cost <= 0:
            return {}
        starts = [self._start(p, record.time) for p in PERIODS]
        teams = ",".join(record.teams)
        return {
            (scope, name, p.value, starts[i]): cost
            for scope, name in budget_keys(record.client, teams)
            for i, p in enumerate(PERIODS)
        }

    def _start(self, period: Period, at: float) -> float:
        """The start of the ``period`` holding ``at``; the last one is kept (zones are slow)."""
        start, end = self._bounds.get(period, (0.0, 0.0))
        if not start <= at < end:
            start, end = self._bounds[period] = self.budgets.calendar.bounds(period, at)
        return start

    def _down(self, exc: DatabaseError) -> None:
        if self.healthy:
            log.error("spend ledger: database unavailable, rows kept in memory: %s", exc)
        self.healthy = False
        self._report(0)

    def _up(self) -> None:
        if not self.healthy:
            log.info("spend ledger: database back")
        self.healthy = True

    def _report(self, written: int) -> None:
        if self._sink is None:
            return
        with self._lock:
            queued = len(self._queue)
            oldest = self._queue[0][0].time if self._queue else None
        lag = max(0.0, self._clock() - oldest) if oldest is not None else 0.0
        self._sink.ledger(written, queued, lag, self._dropped, self.healthy)


def _row(record: UsageRecord, cost: int | None) -> Row:
    return Row(
        record.time, record.request_id, record.route, record.client,
        ",".join(t for t in record.teams if "," not in t), record.model,
        record.credential_source, record.status, record.input, record.output,
        record.cache_read, record.cache_creation_5m, record.cache_creation_1h, cost,
        record.session_id,
    )  # fmt: skip
