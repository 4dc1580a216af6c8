"""Counters for limits: in this process (``memory``) or shared through Redis.

The request path only ever reads and bumps local dictionaries. A ``RedisStore``
pushes the local increments and pulls the shared totals from a background
thread every ``sync_ms``, so a request never waits on Redis; the price is that
another replica's requests are seen up to one sync interval late (the
overshoot the README states). While Redis is unreachable the increments are
kept (up to a bound, beyond which they are counted as lost) and pushed when it
is back.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("extproc.usage.store")
MAX_PENDING_KEYS = 100_000  # increments kept while Redis is away; more are counted as lost
_PURGE_EVERY_S = 10.0


class Store(Protocol):
    """What the limiter needs: windowed counters and per-client requests in flight."""

    @property
    def healthy(self) -> bool: ...

    def get(self, key: str) -> int: ...

    def incr(self, key: str, amount: int, expires_at: float) -> None: ...

    def inflight(self, client: str) -> int: ...

    def inflight_add(self, client: str, delta: int) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Counters of this process alone: exact, and gone with it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # grpcio serves from threads; the lean server from one
        self._counts: dict[str, int] = {}
        self._expiry: dict[str, float] = {}
        self._inflight: dict[str, int] = {}
        self._next_purge = 0.0

    @property
    def healthy(self) -> bool:
        return True

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    def incr(self, key: str, amount: int, expires_at: float) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount
            self._expiry[key] = expires_at
            self._purge()

    def inflight(self, client: str) -> int:
        return self._inflight.get(client, 0)

    def inflight_add(self, client: str, delta: int) -> None:
        with self._lock:
            count = self._inflight.get(client, 0) + delta
            if count > 0:
                self._inflight[client] = count
            else:
                self._inflight.pop(client, None)

    def close(self) -> None:
        """Nothing to let go of: the counters go with the process."""

    def _purge(self) -> None:
        """Drop expired windows now and then (walks live keys, never every client)."""
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_EVERY_S
        for key in [k for k, at in self._expiry.items() if at < now]:
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._counts.pop(key, None)
        self._expiry.pop(key, None)


class RedisStore(MemoryStore):
    """Shared counters: local increments pushed, shared totals pulled, off the request path."""

    def __init__(
        self,
        url: str,
        password: bytes | None,
        sync_s: float,
        clock: Callable[[], float] = time.time,
        on_sync: Callable[[bool, int], None] | None = None,
    ) -> None:
        super().__init__(clock)
        import redis  # only processes with a shared store need the client

        timeout = max(0.5, min(2.0, 4 * sync_s))
        self._redis = redis.Redis.from_url(
            url,
            password=password.decode() if password else None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._sync_s = sync_s
        self._on_sync = on_sync or (lambda ok, lost: None)
        self._instance = uuid.uuid4().hex[:12]
        self._pending: dict[str, tuple[int, float]] = {}  # not yet pushed: (delta, expires_at)
        self._sending: dict[str, int] = {}  # pushed, total not yet known
        self._watch: dict[str, float] = {}  # keys read recently, with their expiry
        self._remote_inflight: dict[str, int] = {}  # other instances' requests in flight
        self._watch_clients: dict[str, float] = {}  # clients whose in-flight count matters
        self._healthy = True
        self._lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="limits-sync", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._healthy

    def get(self, key: str) -> int:
        self._watch[key] = self._expiry.get(key, self._clock() + 120)
        pending = self._pending.get(key)
        return self._counts.get(key, 0) + (pending[0] if pending else 0) + self._sending.get(key, 0)

    def incr(self, key: str, amount: int, expires_at: float) -> None:
        with self._lock:
            if key not in self._pending and len(self._pending) >= MAX_PENDING_KEYS:
                self._lost += amount
                return
            self._add_pending(key, amount, expires_at)
            self._expiry[key] = expires_at
            self._watch[key] = expires_at

    def inflight(self, client: str) -> int:
        self._watch_clients[client] = self._clock() + 60
        return self._inflight.get(client, 0) + self._remote_inflight.get(client, 0)

    def inflight_add(self, client: str, delta: int) -> None:
        self._watch_clients[client] = self._clock() + 60
        super().inflight_add(client, delta)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self._sync_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self._sync_s):
            self.sync()

    def sync(self) -> None:
        """One round trip: push increments, pull totals and other instances' in-flight counts."""
        now = self._clock()
        with self._lock:
            push, self._pending = self._pending, {}
            for key, (delta, _) in push.items():
                self._sending[key] = self._sending.get(key, 0) + delta
            watched = [k for k, at in self._watch.items() if at >= now and k not in push]
            clients = [c for c, at in self._watch_clients.items() if at >= now]
            mine = {c: self._inflight.get(c, 0) for c in clients}
        try:
            results = self._round_trip(push, watched, mine, now)
        except self._errors as exc:
            self._failed(push, exc)
            return
        self._apply(push, watched, clients, results, now)

    def _round_trip(
        self,
        push: dict[str, tuple[int, float]],
        watched: list[str],
        mine: dict[str, int],
        now: float,
    ) -> list[object]:
        pipe = self._redis.pipeline(transaction=False)
        for key, (delta, expires_at) in push.items():
            pipe.incrby(_redis_key(key), delta)
            pipe.expireat(_redis_key(key), int(expires_at) + 1)
        for key in watched:
            pipe.get(_redis_key(key))
        for client, count in mine.items():
            inflight = _redis_key(f"{client}:inflight")
            pipe.hset(inflight, self._instance, f"{count}:{now:.3f}")
            pipe.expire(inflight, 120)
            pipe.hgetall(inflight)
        if not (push or watched or mine):
            pipe.ping()  # nothing to sync: still find out whether the store answers
        results: list[object] = pipe.execute()
        return results

    def _apply(
        self,
        push: dict[str, tuple[int, float]],
        watched: list[str],
        clients: list[str],
        results: list[object],
        now: float,
    ) -> None:
        stale = now - max(5.0, 10 * self._sync_s)
        with self._lock:
            at = 0
            for key, (delta, _) in push.items():
                self._counts[key] = int(results[at])  # type: ignore[call-overload]
                self._unsend(key, delta)
                at += 2
            for key in watched:
                value = results[at]
                self._counts[key] = int(value) if value is not None else 0  # type: ignore[call-overload]
                at += 1
            for client in clients:
                entries = results[at + 2]
                self._remote_inflight[client] = _others(entries, self._instance, stale)
                at += 3
            self._purge_watch(now)
            lost, self._lost = self._lost, 0
        if not self._healthy:
            log.warning("limits store reachable again; local counts pushed")
        self._healthy = True
        self._on_sync(True, lost)

    def _failed(self, push: dict[str, tuple[int, float]], exc: Exception) -> None:
        with self._lock:
            for key, (delta, expires_at) in push.items():
                self._add_pending(key, delta, expires_at)
                self._unsend(key, delta)
            lost, self._lost = self._lost, 0
        if self._healthy:
            log.warning("limits store unreachable (%s); counting locally", type(exc).__name__)
        self._healthy = False
        self._on_sync(False, lost)

    def _add_pending(self, key: str, delta: int, expires_at: float) -> None:
        pending = self._pending.get(key)
        self._pending[key] = ((pending[0] if pending else 0) + delta, expires_at)

    def _unsend(self, key: str, delta: int) -> None:
        """``delta`` of ``key`` is no longer on its way (pushed, or back to pending)."""
        self._sending[key] -= delta
        if not self._sending[key]:
            del self._sending[key]

    def _purge_watch(self, now: float) -> None:
        for key in [k for k, at in self._watch.items() if at < now]:
            self._watch.pop(key, None)
            self._forget(key)
        for client in [c for c, at in self._watch_clients.items() if at < now]:
            self._watch_clients.pop(client, None)
            self._remote_inflight.pop(client, None)


def _redis_key(key: str) -> str:
    return "credential-gateway:" + key


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
