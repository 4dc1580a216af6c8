"""The ledger in SQLite: one row per record, budgets rebuilt at start, kill -9, schema versions."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from extproc.config.model import SecretRef, StoreFailure
from extproc.config.spend import Budget, Period, Spend
from extproc.policy.secrets import SecretError
from extproc.spend.database import (
    SCHEMA_VERSION,
    CounterKey,
    DatabaseError,
    Row,
    SqliteDatabase,
    Totals,
)
from extproc.spend.prices import nano
from extproc.spend.service import SpendService, open_database
from extproc.usage.record import UsageRecord

NOW = datetime(2026, 12, 7, 15, 0, tzinfo=ZoneInfo("UTC")).timestamp()
OPUS = {"input": 10**5, "output": 10**4}  # claude-opus-4-1: 0.1 x $15 + 0.01 x $75 = $2.25


def rec(
    client: str = "alice", source: str = "injected", at: float = NOW, rid: str = "r", **kw: Any
) -> UsageRecord:
    tokens = {**OPUS, **kw}
    return UsageRecord(
        at, rid, "anthropic", client, ("ml",), source, "claude-opus-4-1", 200, 5, "s-1", **tokens
    )


def spend(tmp_path: Path, **kw: Any) -> Spend:
    return Spend(state_dir=tmp_path, clients=(("alice", Budget(day=Decimal(5))),), **kw)


def rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT request_id, client, teams, model, paid_by, input, output, cost_nano, session_id FROM ledger ORDER BY id"
        ).fetchall()


def test_one_row_per_record_with_its_cost_and_who_paid(tmp_path: Path) -> None:
    s = spend(tmp_path)
    service = SpendService(s, open_database(s), clock=lambda: NOW)
    service.records([rec(rid="a"), rec("", "client", rid="b")])
    assert service.flush() == 2
    assert rows(s.sqlite_file) == [
        (
            "a",
            "alice",
            "ml",
            "claude-opus-4-1",
            "injected",
            10**5,
            10**4,
            nano(Decimal("2.25")),
            "s-1",
        ),
        # what the client's own key would have cost at API prices: kept, never charged
        ("b", "", "ml", "claude-opus-4-1", "client", 10**5, 10**4, nano(Decimal("2.25")), "s-1"),
    ]
    # the client-paid one is not counted
    assert service.budgets.spent("organisation")[0] == nano(Decimal("2.25"))
    service.close()


def test_budgets_are_rebuilt_from_the_ledger_at_start(tmp_path: Path) -> None:
    s = spend(tmp_path)
    first = SpendService(s, open_database(s), clock=lambda: NOW)
    first.records([rec(rid="1"), rec(rid="2"), rec(rid="old", at=NOW - 86400)])
    first.close()
    again = SpendService(s, open_database(s), clock=lambda: NOW)
    # today (a Monday) 2 x $2.25, and this week; the month also yesterday's
    assert again.budgets.spent("client", "alice") == (
        nano(Decimal("4.5")),
        nano(Decimal("4.5")),
        nano(Decimal("6.75")),
    )
    assert again.budgets.spent("team", "ml") == (0, 0, 0)  # no team budget configured
    assert again.admit("alice") is None  # $4.50 of $5.00
    again.records([rec(rid="3")])
    refusal = again.admit("alice")
    assert refusal is not None and "$6.75 spent of $5.00" in refusal.message
    again.close()


def test_a_kill_9_loses_only_the_rows_not_yet_written(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path[:0] = {[str(Path.cwd()), str(Path.cwd() / "tests")]!r}
        from unit.test_spend_ledger import rec, spend
        from extproc.spend.service import SpendService, open_database
        s = spend(Path({str(tmp_path)!r}))
        service = SpendService(s, open_database(s))
        service.records([rec(rid=str(i)) for i in range(500)])
        service.flush()
        service.records([rec(rid="unwritten")])  # queued, never flushed
        print("flushed", flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "flushed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    s = spend(tmp_path)
    found = rows(s.sqlite_file)
    assert len(found) == 500 and "unwritten" not in {r[0] for r in found}
    service = SpendService(s, open_database(s), clock=lambda: NOW)
    assert service.budgets.spent("organisation")[0] == 500 * nano(Decimal("2.25"))
    service.close()


def test_the_schema_is_versioned_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    SqliteDatabase(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(
        DatabaseError, match=r"schema version 99 is newer than this gateway's \(1\)"
    ):
        SqliteDatabase(path)


def test_rows_past_the_retention_are_pruned(tmp_path: Path) -> None:
    s = spend(tmp_path, retention_days=30)
    service = SpendService(s, open_database(s), clock=lambda: NOW)
    service.records([rec(rid="old", at=NOW - 31 * 86400), rec(rid="new")])
    service.flush()
    service._prune(NOW)
    assert [r[0] for r in rows(s.sqlite_file)] == ["new"]
    service.close()


class Flaky:
    """A database that is down until told otherwise."""

    where = "flaky"

    def __init__(self) -> None:
        self.down = False
        self.written: list[Row] = []

    def write(self, rows: Sequence[Row], counters: Mapping[CounterKey, int]) -> None:
        if self.down:
            raise DatabaseError("flaky: connection refused")
        self.written.extend(rows)

    def rebuild(self, starts: Mapping[Period, float]) -> Totals:
        return {}

    def counters(self, starts: Mapping[Period, float]) -> Totals:
        return {}

    def sums(self, starts: Mapping[Period, float]) -> Totals:
        return {}

    def prune(self, before: float) -> int:
        return 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return []

    def close(self) -> None:
        pass


@pytest.mark.parametrize("failure", [StoreFailure.OPEN, StoreFailure.CLOSED])
def test_database_down_rows_wait_and_budgets_fail_as_configured(
    tmp_path: Path, failure: StoreFailure
) -> None:
    db = Flaky()
    service = SpendService(spend(tmp_path, on_store_error=failure), db, clock=lambda: NOW)
    db.down = True
    service.records([rec(rid="1")])
    assert service.flush() == 0 and not service.healthy
    refusal = service.admit("alice")
    if failure is StoreFailure.CLOSED:
        assert refusal is not None and refusal.status == 503
    else:
        assert refusal is None
    db.down = False
    service.records([rec(rid="2")])
    assert service.flush() == 2 and service.healthy
    assert [r.request_id for r in db.written] == ["1", "2"]


def test_budgets_reload_live_and_a_store_change_waits_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = spend(tmp_path)
    service = SpendService(s, open_database(s), clock=lambda: NOW)
    service.records([rec(rid="1"), rec(rid="2")])  # $4.50 of alice's $5
    service.flush()
    assert service.admit("alice") is None
    service.reconfigure(replace(s, clients=(("alice", Budget(day=Decimal(4))),)))
    refusal = service.admit("alice")
    assert refusal is not None and "$4.50 spent of $4.00" in refusal.message
    service.reconfigure(replace(service.spend, timezone="Asia/Tokyo", soft_percent=50))
    assert service.spend.timezone == "UTC" and service.spend.soft_percent == 50
    assert "take effect at restart" in caplog.text
    service.close()


def test_workers_on_one_sqlite_file_share_their_budgets(tmp_path: Path) -> None:
    s = spend(tmp_path)
    one = SpendService(s, open_database(s), clock=lambda: NOW, shared=True)
    two = SpendService(s, open_database(s), clock=lambda: NOW, shared=True)
    alone = SpendService(s, open_database(s), clock=lambda: NOW)  # one process: never reads back
    one.records([rec(rid="1"), rec(rid="2"), rec(rid="3")])  # $6.75 of alice's $5
    assert one.flush() == 3
    assert two.admit("alice") is None  # not read yet
    assert two.flush() == 0  # idle, it reads the counters all the same
    refusal = two.admit("alice")
    assert refusal is not None and "$6.75 spent of $5.00" in refusal.message
    alone.flush()
    assert alone.budgets.spent("client", "alice")[0] == 0
    for service in (one, two, alone):
        service.close()


class _Held(Sequence[Row]):
    """Rows whose reading waits for ``go``: a write kept inside its transaction."""

    def __init__(self, rows: list[Row], inside: threading.Event, go: threading.Event) -> None:
        self._rows, self._inside, self._go = rows, inside, go

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: Any) -> Any:
        return self._rows[index]

    def __iter__(self) -> Iterator[Row]:
        self._inside.set()
        assert self._go.wait(30)
        return iter(self._rows)


def test_a_budgets_reload_during_a_flush_waits_for_it_instead_of_failing(tmp_path: Path) -> None:
    # The writer thread flushes while the reload thread reads the counters, on one connection.
    db = SqliteDatabase(tmp_path / "spend.db")
    row = Row(NOW, "r", "anthropic", "alice", "", "m", "injected", 200, 1, 1, 0, 0, 0, 5, "s")
    inside, go = threading.Event(), threading.Event()
    errors: list[str] = []

    def write() -> None:
        db.write(_Held([row], inside, go), {("client", "alice", "day", NOW): 5})

    def read() -> None:
        try:
            db.counters({Period.DAY: NOW})
        except DatabaseError as exc:
            errors.append(str(exc))

    writer = threading.Thread(target=write)
    writer.start()
    assert inside.wait(30)
    reader = threading.Thread(target=read)
    reader.start()
    reader.join(timeout=1)  # without the guard it fails at once; with it, it waits
    go.set()
    writer.join(30)
    reader.join(30)
    assert errors == []
    assert db.counters({Period.DAY: NOW}) == {("client", "alice", Period.DAY): 5}
    db.close()


def test_a_budgets_reload_never_serves_budgets_before_their_spend_is_loaded(
    tmp_path: Path,
) -> None:
    # admit runs on the request path while the reload thread reads the counters
    s = spend(tmp_path)
    db = open_database(s)
    service = SpendService(s, db, clock=lambda: NOW)
    service.records([rec(rid="1"), rec(rid="2"), rec(rid="3")])  # $6.75 of alice's $5
    service.flush()
    seen: list[object] = []
    read = db.counters

    def counters(starts: Mapping[Period, float]) -> Totals:
        seen.append(service.admit("alice"))  # a request arriving during the read
        return read(starts)

    db.counters = counters  # type: ignore[method-assign]
    service.reconfigure(replace(s, clients=(("alice", Budget(day=Decimal(6))),)))
    assert seen and all(refusal is not None for refusal in seen)
    refusal = service.admit("alice")
    assert refusal is not None and "$6.75 spent of $6.00" in refusal.message
    service.close()


def test_a_postgres_password_that_is_not_utf8_is_a_secret_error_quoting_no_byte(
    tmp_path: Path,
) -> None:
    (tmp_path / "pw").write_bytes(b"\xff\xfesecret")
    s = Spend(store="postgresql://u@127.0.0.1:9/db", password=SecretRef(file=tmp_path / "pw"))
    with pytest.raises(SecretError) as caught:
        open_database(s)
    assert "is not UTF-8 text" in str(caught.value) and "0xff" not in str(caught.value)


class _Counting(Flaky):
    """Counters kept in memory; ``after_write`` runs once a batch is committed."""

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict[CounterKey, int] = {}
        self.after_write: list[Any] = []

    def write(self, rows: Sequence[Row], counters: Mapping[CounterKey, int]) -> None:
        super().write(rows, counters)
        for key, amount in counters.items():
            self.totals[key] = self.totals.get(key, 0) + amount
        while self.after_write:
            self.after_write.pop()()

    def counters(self, starts: Mapping[Period, float]) -> Totals:
        wanted = {(p.value, start): p for p, start in starts.items()}
        return {
            (scope, name, wanted[(period, start)]): amount
            for (scope, name, period, start), amount in self.totals.items()
            if (period, start) in wanted
        }


def test_a_budgets_reload_just_after_a_write_counts_the_written_spend_once(
    tmp_path: Path,
) -> None:
    # The reload thread reads the counters after the writer committed a batch but before
    # it took that batch off what is still pending: it must not add the batch twice.
    db = _Counting()
    s = spend(tmp_path)
    service = SpendService(s, db, clock=lambda: NOW)
    service.records([rec(rid="1")])  # $2.25

    reload = threading.Thread(target=service.reconfigure, args=(replace(s, soft_percent=50),))

    def reload_now() -> None:
        reload.start()
        reload.join(timeout=1)  # a fixed reload waits for the flush to finish

    db.after_write.append(reload_now)
    assert service.flush() == 1
    reload.join(30)
    assert service.spend.soft_percent == 50
    service.records([rec(rid="2")])
    service.flush()
    assert service.budgets.spent("client", "alice")[0] == nano(Decimal("4.5"))


def test_a_budgets_reload_while_the_database_is_down_keeps_the_spend_it_knows(
    tmp_path: Path,
) -> None:
    db = Flaky()
    s = spend(tmp_path)
    service = SpendService(s, db, clock=lambda: NOW)
    service.records([rec(rid="1"), rec(rid="2"), rec(rid="3")])  # $6.75 of alice's $5
    assert service.flush() == 3
    db.down = True  # the counters cannot be read for the new budgets
    service.reconfigure(replace(s, clients=(("alice", Budget(day=Decimal(6))),)))
    refusal = service.admit("alice")
    assert refusal is not None and "$6.75 spent of $6.00" in refusal.message


def test_the_price_table_is_loaded_when_the_service_starts_not_by_the_first_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records are priced on the server's event loop: the ~13 ms load must not happen there."""
    from genai_prices.data_snapshot import get_snapshot as real

    from extproc.spend import prices

    loads: list[str] = []

    def counting() -> Any:
        loads.append("load")
        return real()

    monkeypatch.setattr(prices, "get_snapshot", counting)
    s = spend(tmp_path)
    service = SpendService(s, open_database(s), clock=lambda: NOW)
    started = len(loads)
    service.records([rec(rid="a"), replace(rec(rid="b"), model="claude-sonnet-4-5")])
    assert started >= 1 and len(loads) == started
