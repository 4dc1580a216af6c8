"""The shared limits store against a real ``redis-server`` (Debian's, on a free port).

Each ``RedisStore`` here is built with a long sync interval so its background
thread stays asleep, and the test calls ``sync()`` itself: every round trip
happens exactly where the test says.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.redis import RedisServer

from extproc.config.model import Limit, Limits, SecretRef, StoreFailure
from extproc.policy.limits import Refusal
from extproc.usage import store as store_module
from extproc.usage.limiter import Limiter, limiter_for
from extproc.usage.store import RedisStore

ASLEEP = 1000.0  # seconds between background syncs: never, within a test


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis(shared_redis: RedisServer) -> RedisServer:
    assert shared_redis.command("FLUSHALL").startswith(b"+OK")
    return shared_redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, for tests that stop it."""
    server = RedisServer(tmp_path / "redis")
    with server:
        yield server


class Syncs:
    """Records what ``on_sync`` reports: (reachable, counts lost)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, int]] = []

    def __call__(self, ok: bool, lost: int) -> None:
        self.calls.append((ok, lost))


@pytest.fixture
def stores() -> Iterator[Callable[..., RedisStore]]:
    made: list[RedisStore] = []

    def make(url: str, on_sync: Syncs | None = None, password: str | None = None) -> RedisStore:
        made.append(RedisStore(url, password, ASLEEP, on_sync=on_sync))
        return made[-1]

    yield make
    for store in made:
        store.close()


def minute() -> int:
    return int(time.time() // 60)


R = "alice:requests:60"  # alice's requests-per-minute series


def test_two_instances_see_each_others_increments_after_sync(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a, b = stores(redis.url), stores(redis.url)
    m = minute()
    a.incr(R, 60, m, 3)
    assert (a.get(R, 60, m), b.get(R, 60, m)) == (None, None)  # neither has read it
    a.sync()
    assert a.get(R, 60, m) == 3  # the push answered with the total
    assert b.get(R, 60, m) is None  # not synced yet
    b.sync()
    assert b.get(R, 60, m) == 3
    b.incr(R, 60, m, 2)
    assert b.get(R, 60, m) == 5  # its own increment counts at once
    b.sync()
    assert (a.get(R, 60, m), b.get(R, 60, m)) == (3, 5)
    a.sync()
    assert a.get(R, 60, m) == 5
    assert redis.command("GET", f"credential-gateway:{R}:{m}") == b"$1\r\n5\r\n"


def test_a_pushed_key_expires_in_redis_a_minute_and_a_second_after_its_window(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a = stores(redis.url)
    index = int(time.time() // 3600)
    a.incr("alice:tokens:3600", 3600, index, 10)
    a.sync()
    ttl = int(redis.command("TTL", f"credential-gateway:alice:tokens:3600:{index}")[1:].strip())
    expected = (index + 1) * 3600 + 60 + 1 - time.time()
    assert expected - 2 <= ttl <= expected + 1


def test_increments_made_while_redis_is_down_are_pushed_when_it_is_back(
    own_redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    syncs = Syncs()
    a = stores(own_redis.url, syncs)
    m, t = minute(), "alice:tokens:60"
    a.incr(R, 60, m, 1)
    a.sync()
    own_redis.stop()
    a.incr(R, 60, m, 4)
    a.incr(t, 60, m, 7)
    a.sync()
    assert not a.healthy
    assert (a.get(R, 60, m), a.get(t, 60, m)) == (5, 7)  # down: local counts, never unread
    a.incr(t, 60, m, 1)
    a.sync()  # still down: nothing is lost, nothing counted twice
    assert (a.get(R, 60, m), a.get(t, 60, m)) == (5, 8)
    own_redis.start()  # empty: nothing is saved to disk
    a.sync()
    assert a.healthy
    assert syncs.calls == [(True, 0), (False, 0), (False, 0), (True, 0)]
    assert own_redis.command("GET", f"credential-gateway:{R}:{m}") == b"$1\r\n4\r\n"
    assert own_redis.command("GET", f"credential-gateway:{t}:{m}") == b"$1\r\n8\r\n"
    assert (a.get(R, 60, m), a.get(t, 60, m)) == (4, 8)


def test_past_the_pending_bound_new_keys_are_counted_as_lost(
    own_redis: RedisServer, stores: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MAX_PENDING_KEYS", 2)
    syncs = Syncs()
    a = stores(own_redis.url, syncs)
    m = minute()
    own_redis.stop()
    a.sync()  # down: counts are local from here
    a.incr("k1", 60, m, 1)
    a.incr("k2", 60, m, 2)
    a.incr("k3", 60, m, 3)  # a third key: lost
    a.incr("k1", 60, m, 10)  # a key already pending still counts
    a.incr("k4", 60, m, 4)  # lost
    assert [a.get(k, 60, m) for k in ("k1", "k2", "k3", "k4")] == [11, 2, 0, 0]
    a.sync()
    assert syncs.calls == [(False, 0), (False, 7)]
    a.incr("k5", 60, m, 5)  # the failed push is pending again: still full
    own_redis.start()
    a.sync()
    assert syncs.calls[1:] == [(False, 7), (True, 5)]
    assert own_redis.command("GET", f"credential-gateway:k1:{m}") == b"$2\r\n11\r\n"
    assert own_redis.command("EXISTS", f"credential-gateway:k3:{m}") == b":0\r\n"
    a.incr("k5", 60, m, 5)  # room again
    a.sync()
    assert syncs.calls[-1] == (True, 0)  # lost counts are reported once
    assert own_redis.command("GET", f"credential-gateway:k5:{m}") == b"$1\r\n5\r\n"


def test_requests_in_flight_of_other_instances_are_summed(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a, b = stores(redis.url), stores(redis.url)
    a.inflight_add("alice", 1)
    a.inflight_add("alice", 1)
    b.inflight_add("alice", 1)
    assert (a.inflight("alice"), b.inflight("alice")) == (None, None)  # others' not read yet
    a.sync()
    b.sync()
    a.sync()
    assert (a.inflight("alice"), b.inflight("alice")) == (3, 3)
    a.inflight_add("alice", -1)
    assert a.inflight("alice") == 2  # its own, at once
    a.sync()
    b.sync()
    assert b.inflight("alice") == 2
    assert (a.inflight("bob"), b.inflight("bob")) == (None, None)  # asked for: unread
    a.sync()
    b.sync()
    assert (a.inflight("bob"), b.inflight("bob")) == (0, 0)  # then read


def test_stale_or_malformed_in_flight_counts_are_ignored(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a = stores(redis.url)
    a.inflight_add("alice", 1)
    now = time.time()
    entries = {
        "fresh": f"4:{now:.3f}",
        "gone": f"50:{now - 2 * ASLEEP * 10:.3f}",  # older than 10 sync intervals
        "negative": f"-3:{now:.3f}",
        "no-stamp": "6:",
        "bad-stamp": "6:soon",
        "not-a-count": f"x:{now:.3f}",
    }
    for field, value in entries.items():
        redis.command("HSET", "credential-gateway:alice:inflight", field, value)
    a.sync()
    assert a.inflight("alice") == 1 + 4


def test_an_instance_counts_its_own_in_flight_once(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a = stores(redis.url)
    a.inflight_add("alice", 2)
    a.sync()
    a.sync()
    assert a.inflight("alice") == 2
    fields = redis.command("HKEYS", "credential-gateway:alice:inflight")
    assert fields.startswith(b"*1\r\n")


def test_the_background_thread_syncs_on_its_own(redis: RedisServer) -> None:
    syncs = Syncs()
    store = RedisStore(redis.url, None, 0.02, on_sync=syncs)
    store.start()
    try:
        m = minute()
        store.incr(R, 60, m, 2)
        eventually(lambda: redis.command("GET", f"credential-gateway:{R}:{m}") == b"$1\r\n2\r\n")
    finally:
        store.close()
    assert syncs.calls[0] == (True, 0)


def eventually(check: Callable[[], bool], within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"not reached within {within_s} s"
        time.sleep(0.01)


def test_the_password_reaches_redis(own_redis: RedisServer) -> None:
    assert own_redis.command("CONFIG", "SET", "requirepass", "s3cret").startswith(b"+OK")
    results = {}
    for given in ("s3cret", "wrong"):
        syncs = Syncs()
        limits = Limits(store=own_redis.url, password=SecretRef(env="P"), sync_ms=10000)
        limiter = limiter_for(limits, {"P": given}, syncs)
        assert limiter is not None and isinstance(limiter.store, RedisStore)
        limiter.charge("alice", Limit(), 5)  # something to push: an empty sync sends nothing
        limiter.store.sync()  # besides the thread's first round, at its start
        limiter.close()
        results[given] = set(syncs.calls)
    assert results == {"s3cret": {(True, 0)}, "wrong": {(False, 0)}}


def test_a_client_limit_holds_across_two_limiters_after_a_sync(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    now = time.time()  # one instant for both: no window ends mid-test
    one, two = (Limiter(stores(redis.url), lambda: now) for _ in range(2))
    limit = Limit(requests_per_minute=3)

    def admitted(limiter: Limiter, tries: int) -> int:
        return sum(limiter.admit("alice", limit, StoreFailure.OPEN) is None for _ in range(tries))

    assert isinstance(one.store, RedisStore) and isinstance(two.store, RedisStore)
    assert admitted(one, 2) == 1  # its first sight of alice: one request until it has read her
    one.store.sync()
    assert admitted(one, 1) == 1
    assert admitted(two, 1) == 1  # two's first sight: one request
    one.store.sync()
    two.store.sync()
    one.store.sync()
    assert (admitted(one, 5), admitted(two, 5)) == (0, 0)  # both see 3, the limit


def test_an_idle_store_notices_that_redis_is_down(
    own_redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    """With nothing to push, watch or report, a sync still asks Redis (an empty pipeline
    never connects): an idle replica must not report the store up while Redis is down."""
    syncs = Syncs()
    a = stores(own_redis.url, syncs)
    own_redis.stop()
    a.sync()
    assert (a.healthy, syncs.calls) == (False, [(False, 0)])
    own_redis.start()
    a.sync()
    assert (a.healthy, syncs.calls) == (True, [(False, 0), (True, 0)])


# -- one threading model: the sync thread never dies, and never silently -------------------


@pytest.fixture
def racy() -> Iterator[None]:
    """Switch threads every few microseconds, so a race shows up within seconds."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("racy")
def test_the_sync_thread_survives_requests_for_new_clients_while_it_syncs(
    redis: RedisServer,
) -> None:
    """Each new client makes new keys while the thread walks what it syncs. On 7fe3c72 the
    request path added keys unlocked and the thread died within about a second
    (``dictionary changed size during iteration``): limits stopped being shared."""
    syncs = Syncs()
    limiter = limiter_for(Limits(store=redis.url, sync_ms=1), {}, syncs)
    assert limiter is not None
    store = limiter.store
    tokens = Limit(tokens=1000, token_window_s=60)
    try:
        began, n = time.monotonic(), 0
        while time.monotonic() - began < 2:
            limiter.admit(f"c{n}", tokens, StoreFailure.OPEN)
            n += 1
        limiter.charge("marker", tokens, 5)  # pushed only by a thread still alive
        eventually(lambda: b"marker" in redis.command("KEYS", "credential-gateway:marker:*"))
    finally:
        store.close()
    assert store.healthy and all(ok for ok, _ in syncs.calls)


class Bug(Exception):
    """Not a Redis error: what a mistake in the sync code would raise."""


def test_a_bug_in_a_sync_marks_the_store_down_is_logged_once_and_loses_nothing(
    redis: RedisServer,
    stores: Callable[..., RedisStore],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    syncs = Syncs()
    a = stores(redis.url, syncs)
    limiter = Limiter(a)
    m = minute()
    a.incr(R, 60, m, 2)

    def broken(*_: object) -> list[object]:
        raise Bug("a mistake")

    monkeypatch.setattr(a, "_round_trip", broken)
    for _ in range(3):
        a.sync()  # never raises: the thread that calls it goes on
    assert not a.healthy
    assert syncs.calls == [(False, 0)] * 3  # each failed round counted
    assert limiter.admit("alice", Limit(requests_per_minute=9), StoreFailure.CLOSED) == Refusal(
        503, "store", 5, "Limits cannot be checked right now; retry shortly."
    )
    bugs = [r for r in caplog.records if r.name == "extproc.usage.store"]
    assert [(r.levelname, r.exc_info is not None) for r in bugs] == [("ERROR", True)]  # once
    monkeypatch.undo()
    a.sync()
    assert a.healthy and syncs.calls[-1] == (True, 0)
    assert redis.command("GET", f"credential-gateway:{R}:{m}") == b"$1\r\n2\r\n"  # once


def test_the_sync_thread_keeps_syncing_after_a_bug(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = Syncs()
    store = RedisStore(redis.url, None, 0.01, on_sync=syncs)
    real = store._round_trip
    failures = iter(range(3))

    def flaky(*args: Any) -> list[object]:
        if next(failures, None) is not None:
            raise Bug("a mistake")
        return real(*args)

    monkeypatch.setattr(store, "_round_trip", flaky)
    store.start()
    try:
        eventually(lambda: (True, 0) in syncs.calls)
        m = minute()
        store.incr(R, 60, m, 4)
        eventually(lambda: redis.command("GET", f"credential-gateway:{R}:{m}") == b"$1\r\n4\r\n")
    finally:
        store.close()
    assert syncs.calls[:3] == [(False, 0)] * 3 and store.healthy


# -- a replica's first sight of a client ---------------------------------------------------


def admitted(limiter: Limiter, limit: Limit, tries: int, client: str = "alice") -> list[str]:
    """Each try's result: "ok", or the refusal's limit."""
    results = [limiter.admit(client, limit, StoreFailure.OPEN) for _ in range(tries)]
    return ["ok" if r is None else r.limit for r in results]


def test_a_client_moving_to_a_replica_that_never_saw_it_gets_one_request_there(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    """requests_per_minute 6, all used through A; then B, back to back. On 7fe3c72 B admitted
    on its own count (from 0) until its next sync: up to 6 more. Now: 1, the stated bound."""
    now = time.time()
    a, b = (Limiter(stores(redis.url), lambda: now) for _ in range(2))
    limit = Limit(requests_per_minute=6)
    assert admitted(a, limit, 1) == ["ok"]
    assert isinstance(a.store, RedisStore) and isinstance(b.store, RedisStore)
    a.store.sync()
    assert admitted(a, limit, 5) == ["ok"] * 5
    a.store.sync()
    assert admitted(b, limit, 8) == ["ok"] + ["syncing"] * 7
    b.store.sync()
    assert admitted(b, limit, 3) == ["requests_per_minute"] * 3
    key = f"credential-gateway:alice:requests:60:{int(now // 60)}"
    assert redis.command("GET", key) == b"$1\r\n7\r\n"
    assert admitted(b, limit, 1, "bob") == ["ok"]  # another client's first sight: its own


def test_a_first_sight_wakes_the_sync_thread_at_once(redis: RedisServer) -> None:
    """The ticker is asleep (1000 s): only the first sight can make B read alice's count."""
    now = time.time()
    syncs = Syncs()
    a = RedisStore(redis.url, None, ASLEEP)
    b = RedisStore(redis.url, None, ASLEEP, on_sync=syncs)
    limit = Limit(requests_per_minute=1)
    try:
        assert admitted(Limiter(a, lambda: now), limit, 1) == ["ok"]
        a.sync()
        b.start()
        eventually(lambda: len(syncs.calls) == 1)  # the thread's first round, at its start
        limiter = Limiter(b, lambda: now)
        assert admitted(limiter, limit, 1) == ["ok"]  # B's one request
        eventually(lambda: admitted(limiter, limit, 1) == ["requests_per_minute"])
    finally:
        a.close()
        b.close()


def test_a_followed_client_is_read_before_its_next_window_starts(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    """So a client B already follows is never unread at a minute's turn."""
    clock = Clock(60 * (minute() + 1) - 0.5)  # half a second before the next minute
    b = RedisStore(redis.url, None, ASLEEP, clock=clock)
    limiter = Limiter(b, clock)
    limit = Limit(requests_per_minute=5, tokens=100, token_window_s=60)
    try:
        assert admitted(limiter, limit, 1) == ["ok"]
        b.sync()
        clock.now += 1  # the next minute: new windows, read by that sync already
        assert admitted(limiter, limit, 3) == ["ok"] * 3
    finally:
        b.close()


def test_a_client_away_longer_than_the_follow_time_is_unread_again_not_stale(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    """B stops reading alice's counts when she has been away; on her return B must not
    admit on the count it read before (others may have spent since)."""
    clock = Clock(time.time())
    a = stores(redis.url)
    b = RedisStore(redis.url, None, ASLEEP, clock=clock)
    limit = Limit(tokens=10, token_window_s=86400)
    limiter = Limiter(b, clock)
    try:
        assert admitted(limiter, limit, 1) == ["ok"]
        b.sync()  # B follows alice: her tokens read as 0
        clock.now += store_module.WATCH_S + 11  # away: B no longer follows her
        b.sync()
        a.incr("alice:tokens:86400", 86400, int(clock.now // 86400), 10)  # spent through A
        a.sync()
        assert admitted(limiter, limit, 2) == ["ok", "syncing"]  # unread, not the stale 0
        b.sync()
        assert admitted(limiter, limit, 1) == ["tokens"]
    finally:
        b.close()


def test_a_zero_limit_refuses_even_an_unread_client(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    limiter = Limiter(stores(redis.url))
    for limit in (Limit(requests_per_minute=0), Limit(concurrent=0), Limit(tokens=0)):
        assert admitted(limiter, limit, 1) != ["ok"]
    assert admitted(limiter, Limit(requests_per_minute=1), 1) == ["ok"]  # slot still there


def test_requests_in_flight_elsewhere_hold_an_unread_client_to_one_request(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a, b = stores(redis.url), stores(redis.url)
    for _ in range(3):
        a.inflight_add("alice", 1)
    a.sync()
    limit = Limit(concurrent=4)
    limiter = Limiter(b)
    assert admitted(limiter, limit, 2) == ["ok", "syncing"]
    limiter.started("alice")
    b.sync()
    assert admitted(limiter, limit, 1) == ["concurrent"]  # 3 in A, 1 here


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
