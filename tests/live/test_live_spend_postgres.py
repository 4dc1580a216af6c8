"""Spend on a real PostgreSQL (Debian's package, started on a free port): two replicas share
a budget; the server stopped and started mid-run keeps every record; the schema is versioned."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from harness import Gateway, RecordingUpstream, credential_route
from harness.adversary import write_keys
from harness.liveops import poll
from harness.postgres import Postgres, postgres
from live.test_live_spend_e2e import ALICE, MODEL, SERVER, respond

from extproc.config.model import StoreFailure
from extproc.config.spend import Budget, Spend
from extproc.spend.database import SCHEMA_VERSION, DatabaseError, PostgresDatabase
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


def test_two_gateways_on_one_postgresql_share_a_client_budget(
    server: Postgres,
    config: Spend,
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    upstream = start_upstream("anthropic-upstream", responder=respond)
    write_keys(tmp_path / "keys.txt", {"alice": ALICE})
    top = {
        "metering": True,
        "metering_flush_ms": 50,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "spend": {"store": server.url, "flush_ms": 100, "reservation_usd": 0.01,
                  "budgets": {"clients": {"alice": {"day": 0.20}}}},
    }  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    one = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    two = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}

    def post(gateway: Gateway) -> httpx.Response:
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            return client.post("/anthropic/v1/messages", json=body, headers={"x-api-key": ALICE})

    assert post(one).status_code == 200  # $0.11625 on the first gateway
    assert post(two).status_code == 200  # the second has seen it or not: either way under $0.20
    # $0.2325 spent across both: each refuses once it has read the other's spend (a request
    # it admits before that, within one flush_ms, is the stated overshoot across replicas)
    for gateway in (one, two):
        refused = poll(lambda g=gateway: post(g), lambda r: r.status_code == 429, "a 429")
        assert "The daily budget of client 'alice' is used up" in refused.json()["error"]["message"]
    charged = count(server, "SELECT count(*) FROM ledger WHERE paid_by = 'injected'")
    assert 2 <= charged <= 4, charged


def _cluster(server: Postgres) -> list[int]:
    """The server's processes: the postmaster (its pid file's first line) and its children."""
    main = int((server.data / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == main:
                children.append(int(stat.parent.name))
    return [main, *children]


def test_postgresql_that_stops_answering_mid_query_marks_the_store_down_and_rows_wait(
    server: Postgres, config: Spend
) -> None:
    """SIGSTOP: the server's host still acknowledges every packet, so only the gateway's own
    deadline ends the wait (the writer thread, and ``close``, waited forever)."""
    db = PostgresDatabase(config.store, None, timeout_s=1)
    s = SpendService(config, db, clock=lambda: NOW)
    s.records([rec("before")])
    assert s.flush() == 1
    stopped = _cluster(server)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        s.records([rec("during-1"), rec("during-2")])
        flushed: list[int] = []
        writer = threading.Thread(target=lambda: flushed.append(s.flush()), daemon=True)
        began = time.monotonic()
        writer.start()
        writer.join(timeout=60)  # a hung writer fails here, bounded
        waited = time.monotonic() - began
        assert flushed == [0] and not s.healthy, f"still waiting after {waited:.1f} s"
        refusal = s.admit("alice")
        assert refusal is not None and refusal.status == 503  # on_store_error: closed
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert poll(s.flush, lambda n: n == 2, "the waiting rows written") == 2
    assert s.healthy and s.admit("zoe") is None
    ids = {r for (r,) in psycopg.connect(server.url).execute("SELECT request_id FROM ledger")}
    assert ids == {"before", "during-1", "during-2"}
    s.close()


def test_a_statement_past_the_timeout_is_cancelled_by_the_server(
    server: Postgres, config: Spend
) -> None:
    db = PostgresDatabase(config.store, None, timeout_s=1)
    with pytest.raises(DatabaseError, match="statement timeout"):
        db.execute("SELECT pg_sleep(30)")
    assert db.execute("SELECT 1") == [(1,)]  # the connection serves on
    db.close()
