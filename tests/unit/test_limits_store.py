"""The shared limits store against a real ``redis-server`` (Debian's, on a free port).

Each ``RedisStore`` here is built with a long sync interval so its background
thread stays asleep, and the test calls ``sync()`` itself: every round trip
happens exactly where the test says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.redis import RedisServer

from extproc.config.model import Limit, Limits, SecretRef, StoreFailure
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

    def make(url: str, on_sync: Syncs | None = None, password: bytes | None = None) -> RedisStore:
        made.append(RedisStore(url, password, ASLEEP, on_sync=on_sync))
        return made[-1]

    yield make
    for store in made:
        store.close()


def later(seconds: float = 600) -> float:
    return time.time() + seconds


def test_two_instances_see_each_others_increments_after_sync(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a, b = stores(redis.url), stores(redis.url)
    a.incr("alice:requests:60:1", 3, later())
    assert (a.get("alice:requests:60:1"), b.get("alice:requests:60:1")) == (3, 0)
    a.sync()
    assert b.get("alice:requests:60:1") == 0  # not synced yet
    b.sync()
    assert b.get("alice:requests:60:1") == 3
    b.incr("alice:requests:60:1", 2, later())
    assert b.get("alice:requests:60:1") == 5  # its own increment counts at once
    b.sync()
    assert (a.get("alice:requests:60:1"), b.get("alice:requests:60:1")) == (3, 5)
    a.sync()
    assert a.get("alice:requests:60:1") == 5
    assert redis.command("GET", "credential-gateway:alice:requests:60:1") == b"$1\r\n5\r\n"


def test_a_pushed_key_expires_in_redis_a_second_after_its_window(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a = stores(redis.url)
    a.incr("alice:tokens:60:1", 10, time.time() + 100)
    a.sync()
    ttl = int(redis.command("TTL", "credential-gateway:alice:tokens:60:1")[1:].strip())
    assert 99 <= ttl <= 101


def test_increments_made_while_redis_is_down_are_pushed_when_it_is_back(
    own_redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    syncs = Syncs()
    a = stores(own_redis.url, syncs)
    a.incr("alice:requests:60:1", 1, later())
    a.sync()
    own_redis.stop()
    a.incr("alice:requests:60:1", 4, later())
    a.incr("alice:tokens:60:1", 7, later())
    a.sync()
    assert not a.healthy
    assert (a.get("alice:requests:60:1"), a.get("alice:tokens:60:1")) == (5, 7)
    a.incr("alice:tokens:60:1", 1, later())
    a.sync()  # still down: nothing is lost, nothing counted twice
    assert (a.get("alice:requests:60:1"), a.get("alice:tokens:60:1")) == (5, 8)
    own_redis.start()  # empty: nothing is saved to disk
    a.sync()
    assert a.healthy
    assert syncs.calls == [(True, 0), (False, 0), (False, 0), (True, 0)]
    assert own_redis.command("GET", "credential-gateway:alice:requests:60:1") == b"$1\r\n4\r\n"
    assert own_redis.command("GET", "credential-gateway:alice:tokens:60:1") == b"$1\r\n8\r\n"
    assert (a.get("alice:requests:60:1"), a.get("alice:tokens:60:1")) == (4, 8)


def test_past_the_pending_bound_new_keys_are_counted_as_lost(
    own_redis: RedisServer, stores: Callable[..., RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MAX_PENDING_KEYS", 2)
    syncs = Syncs()
    a = stores(own_redis.url, syncs)
    own_redis.stop()
    a.incr("k1", 1, later())
    a.incr("k2", 2, later())
    a.incr("k3", 3, later())  # a third key: lost
    a.incr("k1", 10, later())  # a key already pending still counts
    a.incr("k4", 4, later())  # lost
    assert [a.get(k) for k in ("k1", "k2", "k3", "k4")] == [11, 2, 0, 0]
    a.sync()
    assert syncs.calls == [(False, 7)]
    a.incr("k5", 5, later())  # the failed push is pending again: still full
    own_redis.start()
    a.sync()
    assert syncs.calls == [(False, 7), (True, 5)]
    assert own_redis.command("GET", "credential-gateway:k1") == b"$2\r\n11\r\n"
    assert own_redis.command("EXISTS", "credential-gateway:k3") == b":0\r\n"
    a.incr("k5", 5, later())  # room again
    a.sync()
    assert syncs.calls[-1] == (True, 0)  # lost counts are reported once
    assert own_redis.command("GET", "credential-gateway:k5") == b"$1\r\n5\r\n"


def test_requests_in_flight_of_other_instances_are_summed(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    a, b = stores(redis.url), stores(redis.url)
    a.inflight_add("alice", 1)
    a.inflight_add("alice", 1)
    b.inflight_add("alice", 1)
    assert (a.inflight("alice"), b.inflight("alice")) == (2, 1)
    a.sync()
    b.sync()
    a.sync()
    assert (a.inflight("alice"), b.inflight("alice")) == (3, 3)
    a.inflight_add("alice", -1)
    assert a.inflight("alice") == 2  # its own, at once
    a.sync()
    b.sync()
    assert b.inflight("alice") == 2
    assert (a.inflight("bob"), b.inflight("bob")) == (0, 0)


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
    try:
        store.incr("alice:requests:60:9", 2, later())
        deadline = time.monotonic() + 5
        while not syncs.calls:
            assert time.monotonic() < deadline, "no background sync within 5 s"
            time.sleep(0.01)
    finally:
        store.close()
    assert syncs.calls[0] == (True, 0)
    assert redis.command("GET", "credential-gateway:alice:requests:60:9") == b"$1\r\n2\r\n"


def test_the_password_reaches_redis(own_redis: RedisServer) -> None:
    assert own_redis.command("CONFIG", "SET", "requirepass", "s3cret").startswith(b"+OK")
    results = {}
    for given in ("s3cret", "wrong"):
        syncs = Syncs()
        limits = Limits(store=own_redis.url, password=SecretRef(env="P"), sync_ms=10000)
        limiter = limiter_for(limits, {"P": given}, syncs)
        assert limiter is not None and isinstance(limiter.store, RedisStore)
        limiter.charge("alice", Limit(), 5)  # something to push: an empty sync sends nothing
        limiter.store.sync()
        limiter.close()
        results[given] = syncs.calls
    assert results == {"s3cret": [(True, 0)], "wrong": [(False, 0)]}


def test_a_client_limit_holds_across_two_limiters_after_a_sync(
    redis: RedisServer, stores: Callable[..., RedisStore]
) -> None:
    now = time.time()  # one instant for both: no window ends mid-test
    one, two = (Limiter(stores(redis.url), lambda: now) for _ in range(2))
    limit = Limit(requests_per_minute=3)

    def admitted(limiter: Limiter, tries: int) -> int:
        return sum(limiter.admit("alice", limit, StoreFailure.OPEN) is None for _ in range(tries))

    assert admitted(one, 2) == 2
    assert admitted(two, 1) == 1  # two has not seen one's yet: within a sync, each counts alone
    assert isinstance(one.store, RedisStore) and isinstance(two.store, RedisStore)
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
