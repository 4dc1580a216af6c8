"""The ledger's database: SQLite in a state directory, or PostgreSQL shared by replicas.

One schema for both, versioned in ``schema_version`` and upgraded on start. The
``ledger`` has one row per usage record; ``spend_counters`` holds the charged
spend per budget and calendar period, upserted in the same transaction as the
rows they count, so the two never disagree. Money is integer nano-dollars.
"""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg

from extproc.config.spend import Period

SCHEMA_VERSION = 1
COLUMNS = (
    "time", "request_id", "route", "client", "teams", "model", "paid_by", "status",
    "input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "cost_nano",
    "session_id",
)  # fmt: skip
_LEDGER = (
    "time DOUBLE PRECISION NOT NULL, request_id TEXT NOT NULL, route TEXT NOT NULL, "
    "client TEXT NOT NULL, teams TEXT NOT NULL, model TEXT NOT NULL, paid_by TEXT NOT NULL, "
    "status INTEGER NOT NULL, input BIGINT, output BIGINT, cache_read BIGINT, "
    "cache_write_5m BIGINT, cache_write_1h BIGINT, cost_nano BIGINT, session_id TEXT NOT NULL"
)
# Each version's statements, applied in order; {id} is the backend's row-id column.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE ledger ({id}, " + _LEDGER + ")",
        "CREATE INDEX ledger_time ON ledger (time)",
        "CREATE TABLE spend_counters (scope TEXT NOT NULL, name TEXT NOT NULL, "
        "period TEXT NOT NULL, start DOUBLE PRECISION NOT NULL, nano BIGINT NOT NULL, "
        "PRIMARY KEY (scope, name, period, start))",
    ),
}
_INSERT_ROW = (
    "INSERT INTO ledger (time, request_id, route, client, teams, model, paid_by, status, input, "
    "output, cache_read, cache_write_5m, cache_write_1h, cost_nano, session_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ADD_COUNTER = (
    "INSERT INTO spend_counters VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (scope, name, period, start) DO UPDATE "
    "SET nano = spend_counters.nano + excluded.nano"
)
CounterKey = tuple[str, str, str, float]  # scope, name, period, period start
Totals = dict[tuple[str, str, Period], int]


class DatabaseError(Exception):
    """The database cannot be reached or refused a statement; the message names where."""


@dataclass(frozen=True, slots=True)
class Row:
    """One ledger row: a record, who paid and what it cost (None: unknown)."""

    time: float
    request_id: str
    route: str
    client: str
    teams: str  # comma-separated (names never hold a comma)
    model: str
    paid_by: str  # "injected" (the organisation, charged), "client" or "none"
    status: int
    input: int | None
    output: int | None
    cache_read: int | None
    cache_write_5m: int | None
    cache_write_1h: int | None
    cost_nano: int | None
    session_id: str

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, c) for c in COLUMNS)


class Database(Protocol):
    where: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def write(self, rows: Sequence[Row], counters: Mapping[CounterKey, int]) -> None: ...

    def rebuild(self, starts: Mapping[Period, float]) -> Totals: ...

    def sums(self, starts: Mapping[Period, float]) -> Totals: ...

    def counters(self, starts: Mapping[Period, float]) -> Totals: ...

    def prune(self, before: float) -> int: ...

    def close(self) -> None: ...


class _Common:
    """SQL both backends share; ``_ph`` is the parameter placeholder.

    One connection serves the writer thread and the reload thread (a live budgets
    reload reads the counters): ``_guard`` lets one transaction run on it at a time.
    """

    where = ""
    _ph = "?"
    _id = ""
    _guard: threading.Lock

    def _sql(self, text: str) -> str:
        return text.replace("?", self._ph)

    def _lock_counters(self, cur: Any) -> None:
        """Hold the counters while they are rebuilt (other replicas wait)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._transaction() as cur:
                cur.execute(self._sql(sql), params)
                return list(cur.fetchall()) if cur.description else []
        except (sqlite3.Error, psycopg.Error) as exc:
            raise DatabaseError(f"{self.where}: {_first_line(exc)}") from None

    def migrate(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION``; returns the version found before."""
        try:
            with self._transaction() as cur:
                self._serialise(cur)
                cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                cur.execute("SELECT version FROM schema_version")
                found = cur.fetchall()
                before = int(found[0][0]) if found else 0
                if before > SCHEMA_VERSION:
                    raise DatabaseError(
                        f"{self.where}: schema version {before} is newer than this gateway's "
                        f"({SCHEMA_VERSION}); upgrade the gateway"
                    )
                for version in range(before + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[version]:
                        cur.execute(statement.format(id=self._id))
                cur.execute("DELETE FROM schema_version")
                cur.execute(self._sql("INSERT INTO schema_version VALUES (?)"), (SCHEMA_VERSION,))
                return before
        except (sqlite3.Error, psycopg.Error) as exc:
            raise DatabaseError(f"{self.where}: {_first_line(exc)}") from None

    def write(self, rows: Sequence[Row], counters: Mapping[CounterKey, int]) -> None:
        insert, upsert = self._sql(_INSERT_ROW), self._sql(_ADD_COUNTER)
        try:
            with self._transaction() as cur:
                cur.executemany(insert, [r.values() for r in rows])
                if counters:
                    cur.executemany(upsert, [(*key, n) for key, n in sorted(counters.items())])
        except (sqlite3.Error, psycopg.Error) as exc:
            raise DatabaseError(f"{self.where}: {_first_line(exc)}") from None

    def rebuild(self, starts: Mapping[Period, float]) -> Totals:
        """Recompute the current periods' counters from the ledger (at start)."""
        try:
            with self._transaction() as cur:
                self._lock_counters(cur)
                totals = self._sums(cur, starts)
                for period, start in starts.items():
                    cur.execute(
                        self._sql("DELETE FROM spend_counters WHERE period = ? AND start = ?"),
                        (period.value, start),
                    )
                rows = [(s, n, p.value, starts[p], v) for (s, n, p), v in totals.items()]
                cur.executemany(
                    self._sql("INSERT INTO spend_counters VALUES (?, ?, ?, ?, ?)"), rows
                )
        except (sqlite3.Error, psycopg.Error) as exc:
            raise DatabaseError(f"{self.where}: {_first_line(exc)}") from None
        return totals

    def sums(self, starts: Mapping[Period, float]) -> Totals:
        """Charged spend per budget since each start, from the ledger (read only)."""
        try:
            with self._transaction() as cur:
                return self._sums(cur, starts)
        except (sqlite3.Error, psycopg.Error) as exc:
            raise DatabaseError(f"{self.where}: {_first_line(exc)}") from None

    def _sums(self, cur: Any, starts: Mapping[Period, float]) -> Totals:
        totals: Totals = {}
        for period, start in starts.items():
            cur.execute(
                self._sql(
                    "SELECT client, teams, SUM(cost_nano) FROM ledger WHERE paid_by = "
                    "'injected' AND cost_nano > 0 AND time >= ? GROUP BY client, teams"
                ),
                (start,),
            )
            for client, teams, amount in cur.fetchall():
                for key in budget_keys(client, teams):
                    k = (*key, period)
                    totals[k] = totals.get(k, 0) + int(amount)
        return totals

    def counters(self, starts: Mapping[Period, float]) -> Totals:
        totals: Totals = {}
        for period, start in starts.items():
            found = self.execute(
                "SELECT scope, name, nano FROM spend_counters WHERE period = ? AND start = ?",
                (period.value, start),
            )
            for scope, name, amount in found:
                totals[(scope, name, period)] = int(amount)
        return totals

    def prune(self, before: float) -> int:
        """Drop ledger rows and counters older than the retention."""
        gone = self.execute("DELETE FROM ledger WHERE time < ? RETURNING 1", (before,))
        self.execute("DELETE FROM spend_counters WHERE start < ?", (before,))
        return len(gone)

    def _serialise(self, cur: Any) -> None:
        """One replica migrates at a time."""

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._guard, self._begin() as cur:
            yield cur

    def _begin(self) -> Any:
        raise NotImplementedError


def budget_keys(client: str, teams: str) -> Iterable[tuple[str, str]]:
    """The budgets one charged row counts for: its client, each team, the organisation."""
    if client:
        yield ("client", client)
    for team in filter(None, teams.split(",")):
        yield ("team", team)
    yield ("organisation", "")


class SqliteDatabase(_Common):
    """A file in the state directory; WAL, so readers (the ``spend`` command) never block it."""

    _id = "id INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: Path) -> None:
        self.where = f"sqlite {path}"
        self._guard = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=5, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # A committed batch survives kill -9 (the WAL is written before commit returns);
            # only a power cut may lose the last transactions.
            self._db.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"{self.where}: {_first_line(exc)}") from None
        self.migrate()

    def _begin(self) -> Any:
        return _SqliteTransaction(self._db)

    def _serialise(self, cur: Any) -> None:
        pass  # BEGIN IMMEDIATE already holds the write lock

    def close(self) -> None:
        self._db.close()


class _SqliteTransaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Cursor:
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        self._cur = cur
        return cur

    def __exit__(self, kind: object, *rest: object) -> None:
        self._cur.execute("ROLLBACK" if kind else "COMMIT")


class PostgresDatabase(_Common):
    """PostgreSQL (psycopg 3): the ledger and the counters every replica shares.

    A server that stops answering must not hold the writer (and ``close``) forever: a
    statement ends after ``timeout_s`` on the server, TCP gives up on a peer gone as long
    (keepalives, ``tcp_user_timeout``), and a transaction still waiting after three times
    that (a server hung, its host still acknowledging) has its connection cut here. Each
    ends in a DatabaseError: the store is down and the rows wait in memory.
    """

    _ph = "%s"
    _id = "id BIGSERIAL PRIMARY KEY"

    def __init__(self, url: str, password: str | None, timeout_s: float = 5.0) -> None:
        self.where = "postgresql " + url.split("://", 1)[1].rsplit("@", maxsplit=1)[-1]
        self._url = url
        self._password = password
        self._db: psycopg.Connection[Any] | None = None
        self._guard = threading.Lock()
        self.timeout_s = timeout_s
        self.migrate()

    def _conn(self) -> psycopg.Connection[Any]:
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                self._db.close()  # a broken one still holds its socket
            ms = max(1, int(self.timeout_s * 1000))
            self._db = psycopg.connect(
                self._url,
                connect_timeout=max(2, math.ceil(self.timeout_s)),
                autocommit=True,
                password=self._password or None,
                options=f"-c statement_timeout={ms}",
                keepalives=1,
                keepalives_idle=max(1, int(self.timeout_s)),
                keepalives_interval=1,
                keepalives_count=3,
                tcp_user_timeout=ms,
            )
        return self._db

    def _cut(self, db: psycopg.Connection[Any]) -> None:
        """End a transaction that waits too long: the waiting read sees the connection
        closed and raises, and the connection is broken (made again on the next use)."""
        with suppress(OSError, psycopg.Error):
            cut = socket.socket(fileno=os.dup(db.fileno()))
            with cut:
                cut.shutdown(socket.SHUT_RDWR)

    def _begin(self) -> Any:
        return _PostgresTransaction(self)

    def _serialise(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(7416001)")

    def _lock_counters(self, cur: Any) -> None:
        cur.execute("LOCK TABLE spend_counters IN EXCLUSIVE MODE")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


class _PostgresTransaction:
    def __init__(self, owner: PostgresDatabase) -> None:
        self._owner = owner
        self._ended = threading.Lock()  # held once the transaction ends: no cut after that

    def __enter__(self) -> psycopg.Cursor[Any]:
        db = self._owner._conn()
        self._watch = threading.Timer(3 * self._owner.timeout_s, self._overdue, (db,))
        self._watch.daemon = True
        self._watch.start()
        try:
            self._tx = db.transaction()
            self._tx.__enter__()
        except BaseException:
            self._end()
            raise
        self._cur = db.cursor()
        return self._cur

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        try:
            self._cur.close()
            self._tx.__exit__(kind, value, tb)
        finally:
            self._end()

    def _end(self) -> None:
        self._watch.cancel()
        self._ended.acquire(blocking=False)

    def _overdue(self, db: psycopg.Connection[Any]) -> None:
        if self._ended.acquire(blocking=False):
            self._owner._cut(db)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
