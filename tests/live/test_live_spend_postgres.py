"""Spend on a real PostgreSQL (Debian's package, started on a free port): two replicas share
a budget; the server stopped and started mid-run keeps every record; the schema is versioned."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from harness.postgres import Postgres, postgres

from extproc.config.model import StoreFailure
from extproc.config.spend import Budget, Spend
from extproc.spend.database import SCHEMA_VERSION, PostgresDatabase
from extproc.spend.prices import nano
from extproc.spend.service import SpendService, open_database
from extproc.usage.record import UsageRecord

pytestmark = pytest.mark.slow  # Debian's postgresql comes from `make spend-deps`
NOW = datetime(2026, 12, 7, 15, 0, tzinfo=ZoneInfo("UTC")).timestamp()


def rec(rid: str, client: str = "alice") -> UsageRecord:
    # claude-opus-4-1: 0.1M input x $15 + 0.01M output x $75 = $2.25
    return UsageRecord(
        NOW,
        rid,
        "anthropic",
        client,
        ("ml",),
        "injected",
        "claude-opus-4-1",
        200,
        5,
        input=10**5,
        output=10**4,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[Postgres]:
    with postgres() as pg:
        yield pg


@pytest.fixture
def config(server: Postgres) -> Iterator[Spend]:
    with psycopg.connect(server.url, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS ledger, spend_counters, schema_version")
    yield Spend(
        store=server.url, teams=(("ml", Budget(day=Decimal(5))),),
        on_store_error=StoreFailure.CLOSED,
    )  # fmt: skip


def service(spend: Spend) -> SpendService:
    return SpendService(spend, open_database(spend), clock=lambda: NOW)


def count(server: Postgres, sql: str) -> Any:
    with psycopg.connect(server.url) as db:
        row = db.execute(sql).fetchone()
        return row[0] if row else None


def test_two_replicas_on_one_postgresql_share_a_team_budget(
    server: Postgres, config: Spend
) -> None:
    a, b = service(config), service(config)
    a.records([rec("1"), rec("2", "bob")])  # $4.50 of the team's $5 by two clients
    assert a.flush() == 2
    assert b.admit("carol", ("ml",)) is None  # b has not read a's spend yet, and it is under
    b.records([rec("3", "carol")])
    assert b.flush() == 1  # b writes, then reads every replica's counters: $6.75
    refusal = b.admit("dave", ("ml",))
    assert (
        refusal is not None
        and "team 'ml'" in refusal.message
        and "$6.75 spent of $5.00" in refusal.message
    )
    assert a.flush() == 0  # nothing of its own to write: it still reads b's spend
    assert a.admit("erin", ("ml",)) is not None
    assert count(server, "SELECT count(*) FROM ledger") == 3
    assert count(server, "SELECT max(version) FROM schema_version") == SCHEMA_VERSION
    a.close()
    b.close()
    again = service(config)  # rebuilt from the ledger at start
    assert again.budgets.spent("team", "ml")[0] == 3 * nano(Decimal("2.25"))
    again.close()


def test_postgresql_stopped_mid_run_keeps_the_records_and_fails_closed(
    server: Postgres, config: Spend
) -> None:
    s = service(config)
    s.records([rec("before")])
    assert s.flush() == 1
    server.stop()
    try:
        s.records([rec("during-1"), rec("during-2")])
        assert s.flush() == 0 and not s.healthy
        refusal = s.admit("alice")
        assert refusal is not None and refusal.status == 503  # on_store_error: closed
    finally:
        server.start()
    assert s.flush() == 2 and s.healthy
    assert s.admit("zoe") is None
    ids = {r for (r,) in psycopg.connect(server.url).execute("SELECT request_id FROM ledger")}
    assert ids == {"before", "during-1", "during-2"}
    s.close()


def test_the_schema_is_upgraded_once(server: Postgres, config: Spend) -> None:
    first = PostgresDatabase(config.store, None)
    assert first.migrate() == SCHEMA_VERSION  # already at the current version: nothing applied
    first.close()
    assert count(server, "SELECT count(*) FROM schema_version") == 1
