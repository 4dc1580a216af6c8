"""Counters for limits: in this process (``memory``) or shared through Redis.

A counter is window ``index`` of a *series* (``alice:requests:60``: alice's
requests in windows of 60 s). The request path never waits on Redis: a
``RedisStore`` counts locally, and its sync thread pushes the local increments
and reads the shared totals every ``sync_ms``; another replica's requests are
seen up to one sync late (the overshoot the README states).

Threading model of ``RedisStore``, one rule: every dictionary is guarded by
``_lock``. The request path holds it for a few dictionary operations, never
for I/O and never for a walk; the sync thread holds it to take a snapshot and
to apply results (in chunks, so no request waits behind a long apply), walks
only what it copied, and talks to Redis without it. ``sync`` never raises: a
failure of any kind marks the store down, is logged once per episode and is
reported to ``on_sync`` (the metrics: ``gateway_limits_store_up`` 0, a failure counted).

Requests in flight are *leases*: each start holds one until its record ends it, or for
at most ``INFLIGHT_LEASE_S``, so a record that never comes (the access-log stream down, or
Envoy's buffer full) cannot hold a client's slot until a restart. A record ends the client's
oldest lease (records name no lease); one whose lease has run out ends nothing.

A series the replica has never read is *unread*: ``get`` answers None, and the
limiter lets the client have one request (``unread_admit``) while the sync
thread, woken at once, reads it. The sync also reads the next window of every
series it follows before that window starts, so only a first sight is unread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("extproc.usage.store")
MAX_PENDING_KEYS = 100_000  # increments kept while Redis is away; more are counted as lost
WATCH_S = 120.0  # a series or client not asked about for this long is no longer synced
KEEP_S = 60  # a window's counter outlives its end by this much (a replica's clock may lag)
APPLY_CHUNK = 256  # results applied per hold of the lock
_PURGE_EVERY_S = 10.0
INFLIGHT_LEASE_S = 600.0  # a request in flight whose record never came stops counting then

OnSync = Callable[[bool, int], None]  # (the sync worked, counts lost since the last report)


class Store(Protocol):
    """What the limiter needs: windowed counters and per-client requests in flight."""

    @property
    def healthy(self) -> bool: ...

    def get(self, series: str, seconds: int, index: int) -> int | None:
        """The window's count; None while a shared count has not been read yet."""
        ...

    def incr(self, series: str, seconds: int, index: int, amount: int) -> None: ...

    def inflight(self, client: str) -> int | None:
        """Requests in flight; None while other replicas' have not been read yet."""
        ...

    def inflight_add(self, client: str, delta: int) -> None: ...

    def unread_admit(self, client: str) -> bool:
        """Take the one request ``client`` may have while its counts are unread."""
        ...

    def close(self) -> None: ...


class Leases:
    """Requests in flight per client, each counted from its start for at most ``lease_s``.

    Not locked: the store that holds it calls it under its own lock. Leases of one client
    end in the order they started (one lease length), so the expired ones are at the front.
    """

    def __init__(self, lease_s: float) -> None:
        self._lease_s = lease_s
        self._held: dict[str, deque[float]] = {}  # client -> when each lease ends

    def count(self, client: str, now: float) -> int:
        held = self._held.get(client)
        if not held:
            return 0
        while held and held[0] < now:
            held.popleft()
        if not held:
            del self._held[client]
        return len(held)

    def add(self, client: str, delta: int, now: float) -> None:
        """``delta`` leases more (started) or fewer (finished: the oldest end first)."""
        if delta > 0:
            self._held.setdefault(client, deque()).extend([now + self._lease_s] * delta)
            return
        for _ in range(min(-delta, self.count(client, now))):
            self._held[client].popleft()
        self.count(client, now)  # drops the client's entry once it holds none

    def purge(self, now: float) -> None:
        """Forget run-out leases of clients not asked about since (walks clients in flight)."""
        for client in list(self._held):
            self.count(client, now)


def window_key(series: str, index: int) -> str:
    return f"{series}:{index}"


def _expires(seconds: int, index: int) -> float:
    return (index + 1) * seconds + KEEP_S


class MemoryStore:
    """Counters of this process alone: exact, and gone with it.

    Writes and in-flight reads (they drop run-out leases) hold the lock (grpcio serves
    from threads); a count read is one dictionary lookup, atomic on its own.
    """

    def __init__(
        self, clock: Callable[[], float] = time.time, lease_s: float = INFLIGHT_LEASE_S
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._expiry: dict[str, float] = {}
        self._inflight = Leases(lease_s)
        self._next_purge = 0.0

    @property
    def healthy(self) -> bool:
        return True

    def get(self, series: str, seconds: int, index: int) -> int:
        return self._counts.get(window_key(series, index), 0)

    def incr(self, series: str, seconds: int, index: int, amount: int) -> None:
        key = window_key(series, index)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount
            self._expiry[key] = _expires(seconds, index)
            self._purge()

    def inflight(self, client: str) -> int:
        with self._lock:
            return self._inflight.count(client, self._clock())

    def inflight_add(self, client: str, delta: int) -> None:
        with self._lock:
            self._inflight.add(client, delta, self._clock())

    def unread_admit(self, client: str) -> bool:
        return True  # nothing is ever unread here

    def close(self) -> None:
        """Nothing to let go of: the counters go with the process."""

    def _purge(self) -> None:
        """Drop expired windows now and then (walks live keys, never every client)."""
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_EVERY_S
        _drop_expired(self._counts, self._expiry, now)
        self._inflight.purge(now)


class RedisStore:
    """Shared counters: local increments pushed, shared totals pulled, off the request path.

    ``start`` runs the sync thread (``limiter_for`` does): a first round at once,
    then one every ``sync_s`` or sooner when a client is unread. Without it,
    ``sync`` runs where its caller says (the tests).
    """

    def __init__(
        self,
        url: str,
        password: str | None,
        sync_s: float,
        *,
        clock: Callable[[], float] = time.time,
        on_sync: OnSync | None = None,
        lease_s: float = INFLIGHT_LEASE_S,
    ) -> None:
        import redis  # only processes with a shared store need the client

        timeout = max(0.5, min(2.0, 4 * sync_s))
        self._redis = redis.Redis.from_url(
            url,
            password=password or None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._sync_s = sync_s
        self._clock = clock
        self._on_sync = on_sync or _ignore
        self._instance = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._rounds = threading.Lock()  # one sync at a time (the thread's, or a caller's)
        self._counts: dict[str, int] = {}  # shared totals as last read: a key here is read
        self._expiry: dict[str, float] = {}
        self._pending: dict[str, tuple[int, float]] = {}  # not yet pushed: (delta, expires_at)
        self._pushing: dict[str, tuple[int, float]] = {}  # the batch on its way to Redis
        self._series: dict[str, tuple[int, float]] = {}  # series -> (seconds, followed until)
        self._clients: dict[str, float] = {}  # client -> followed until (its in-flight hash)
        self._inflight = Leases(lease_s)  # this instance's requests in flight
        self._remote: dict[str, int] = {}  # other instances' requests in flight, once read
        self._unread: set[str] = set()  # clients that had their one request while unread
        self._healthy = True
        self._failure = ""  # the current failure episode's kind; "" while syncs work
        self._lost = 0
        self._next_purge = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="limits-sync", daemon=True)

    @property
    def healthy(self) -> bool:
        return self._healthy

    def get(self, series: str, seconds: int, index: int) -> int | None:
        key = window_key(series, index)
        with self._lock:
            self._series[series] = (seconds, self._clock() + WATCH_S)
            shared = self._counts.get(key)
            if shared is None and self._healthy:
                return None
            return (shared or 0) + self._local(key)

    def incr(self, series: str, seconds: int, index: int, amount: int) -> None:
        key = window_key(series, index)
        expires_at = _expires(seconds, index)
        with self._lock:
            if series not in self._series:  # a count of a series no one follows is never read
                self._series[series] = (seconds, self._clock() + WATCH_S)
            if key not in self._pending and len(self._pending) >= MAX_PENDING_KEYS:
                self._lost += amount
                return
            _add_pending(self._pending, key, amount, expires_at)
            self._expiry[key] = expires_at

    def inflight(self, client: str) -> int | None:
        with self._lock:
            self._clients[client] = self._clock() + WATCH_S
            remote = self._remote.get(client)
            if remote is None and self._healthy:
                return None
            return self._inflight.count(client, self._clock()) + (remote or 0)

    def inflight_add(self, client: str, delta: int) -> None:
        with self._lock:
            now = self._clock()
            self._clients[client] = now + WATCH_S
            self._inflight.add(client, delta, now)

    def unread_admit(self, client: str) -> bool:
        with self._lock:
            if client in self._unread:
                return False
            self._unread.add(client)
        self._wake.set()  # read it now, not at the next tick
        return True

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self._sync_s + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sync()
            self._wake.wait(self._sync_s)
            self._wake.clear()

    def sync(self) -> None:
        """One round trip: push increments, read totals and others' in-flight counts.

        Never raises: Redis unreachable or a bug here, the store is down until a
        round works again, and the increments wait in ``_pending``.
        """
        with self._rounds:
            try:
                self._sync()
            except self._errors as exc:
                self._failed(exc, bug=False)
            except Exception as exc:  # a bug must not end shared limits silently
                self._failed(exc, bug=True)

    def _sync(self) -> None:
        now = self._clock()
        with self._lock:
            push = self._pushing = self._pending
            self._pending = {}
            series = list(self._series.items())
            clients = [c for c, until in self._clients.items() if until >= now]
            mine = {c: self._inflight.count(c, now) for c in clients}
            unread = list(self._unread)
        reads = _to_read(series, push, now, 2 * self._sync_s)
        results = self._round_trip(push, reads, mine, now)
        self._apply(list(push), reads, clients, results, now)
        with self._lock:
            self._unread.difference_update(unread)  # everything they asked for is read now
            self._purge(now)
            lost, self._lost = self._lost, 0
        if self._failure:
            log.warning("limits store syncing again; local counts pushed")
        self._failure = ""
        self._healthy = True
        self._on_sync(True, lost)

    def _round_trip(
        self,
        push: dict[str, tuple[int, float]],
        reads: list[tuple[str, float]],
        mine: dict[str, int],
        now: float,
    ) -> list[object]:
        pipe = self._redis.pipeline(transaction=False)
        for key, (delta, expires_at) in push.items():
            pipe.incrby(_redis_key(key), delta)
            pipe.expireat(_redis_key(key), int(expires_at) + 1)
        for key, _ in reads:
            pipe.get(_redis_key(key))
        for client, count in mine.items():
            inflight = _redis_key(f"{client}:inflight")
            pipe.hset(inflight, self._instance, f"{count}:{now:.3f}")
            pipe.expire(inflight, 120)
            pipe.hgetall(inflight)
        if not (push or reads or mine):
            pipe.ping()  # nothing to sync: still find out whether the store answers
        results: list[object] = pipe.execute()
        return results

    def _apply(
        self,
        pushed: list[str],
        reads: list[tuple[str, float]],
        clients: list[str],
        results: list[object],
        now: float,
    ) -> None:
        """Results into the local view, a chunk per hold of the lock."""
        totals = [(key, _count(results[2 * i])) for i, key in enumerate(pushed)]
        at = 2 * len(pushed)
        values = [(key, _count(results[at + i]), until) for i, (key, until) in enumerate(reads)]
        at += len(reads)
        stale = now - max(5.0, 10 * self._sync_s)
        remote = {c: _others(results[at + 3 * i + 2], self._instance, stale) for i, c in
                  enumerate(clients)}  # fmt: skip
        for start in range(0, len(totals), APPLY_CHUNK):
            with self._lock:
                for key, total in totals[start : start + APPLY_CHUNK]:
                    self._counts[key] = total
                    del self._pushing[key]
        for start in range(0, len(values), APPLY_CHUNK):
            with self._lock:
                for key, value, until in values[start : start + APPLY_CHUNK]:
                    self._counts[key] = value
                    self._expiry[key] = until
        with self._lock:
            self._remote.update(remote)

    def _failed(self, exc: Exception, bug: bool) -> None:
        """The store is down until a round works; each kind of failure is logged once."""
        with self._lock:
            for key, (delta, expires_at) in self._pushing.items():
                _add_pending(self._pending, key, delta, expires_at)
            self._pushing = {}
            lost, self._lost = self._lost, 0
        kind = "bug" if bug else "unreachable"
        if kind != self._failure:
            if bug:
                log.error("limits store sync failed on a bug; counting locally", exc_info=exc)
            else:
                log.warning("limits store unreachable (%s); counting locally", type(exc).__name__)
        self._failure = kind
        self._healthy = False
        self._on_sync(False, lost)

    def _local(self, key: str) -> int:
        """This instance's increments of ``key`` not yet in a total it read."""
        pending = self._pending.get(key)
        pushing = self._pushing.get(key)
        return (pending[0] if pending else 0) + (pushing[0] if pushing else 0)

    def _purge(self, now: float) -> None:
        """Now and then: forget expired windows and series and clients no longer asked about."""
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_EVERY_S
        _drop_expired(self._counts, self._expiry, now)
        gone = {s for s, (_, until) in self._series.items() if until < now}
        for series in gone:
            del self._series[series]
        if gone:  # their counts are no longer read: unread (not stale) if asked for again
            for key in [k for k in self._counts if k.rpartition(":")[0] in gone]:
                del self._counts[key]
                self._expiry.pop(key, None)
        for client in [c for c, until in self._clients.items() if until < now]:
            del self._clients[client]
            self._remote.pop(client, None)
        self._inflight.purge(now)


def _to_read(
    series: list[tuple[str, tuple[int, float]]],
    push: dict[str, tuple[int, float]],
    now: float,
    lead: float,
) -> list[tuple[str, float]]:
    """The keys (with their expiry) to read: each followed series' current window, and
    the next one once it is less than ``lead`` away, so a window is read before it starts."""
    keys = []
    for name, (seconds, until) in series:
        if until < now:
            continue
        first = int(now // seconds)
        last = min(first + 1, int((now + lead) // seconds))
        for index in range(first, last + 1):
            key = window_key(name, index)
            if key not in push:  # a push answers with the total
                keys.append((key, _expires(seconds, index)))
    return keys


def _add_pending(pending: dict[str, tuple[int, float]], key: str, delta: int, at: float) -> None:
    before = pending.get(key)
    pending[key] = ((before[0] if before else 0) + delta, at)


def _drop_expired(counts: dict[str, int], expiry: dict[str, float], now: float) -> None:
    for key in [k for k, at in expiry.items() if at < now]:
        counts.pop(key, None)
        del expiry[key]


def _ignore(ok: bool, lost: int) -> None:
    """No one listens to sync results."""


def _redis_key(key: str) -> str:
    return "credential-gateway:" + key


def _count(value: object) -> int:
    """A counter as Redis answers it (absent: 0)."""
    return int(value) if isinstance(value, (bytes, int)) else 0


def _others(entries: object, instance: str, stale: float) -> int:
    """The sum of other instances' fresh in-flight counts in one client's hash."""
    total = 0
    if not isinstance(entries, dict):
        return 0
    for field, value in entries.items():
        if field == instance.encode():
            continue
        count, _, stamp = value.decode(errors="replace").partition(":")
        try:
            fresh = float(stamp) >= stale
        except ValueError:
            continue
        if count.isdigit() and fresh:
            total += int(count)
    return total
