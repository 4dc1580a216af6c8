"""Requests in flight are leases: a record that never comes frees its slot when the lease ends.

A request counts in flight from its decision until its usage record arrives; a record lost
(the access-log stream down, Envoy's buffer full) must not hold the slot until a restart, or
a client could be refused forever. Proved with an injected clock, in memory and through Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.redis import RedisServer

from extproc.config.model import Limit, StoreFailure
from extproc.usage.limiter import Limiter
from extproc.usage.store import INFLIGHT_LEASE_S, Leases, MemoryStore, RedisStore

ASLEEP = 1000.0  # seconds between background syncs: never, within a test
TWO = Limit(concurrent=2)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def admits(lim: Limiter) -> bool:
    return lim.admit("alice", TWO, StoreFailure.OPEN) is None


def test_a_slot_whose_record_never_comes_is_free_again_when_its_lease_ends() -> None:
    clock = Clock(1000.0)
    lim = Limiter(MemoryStore(clock), clock)
    lim.started("alice")  # both records are lost
    clock.now += 100
    lim.started("alice")
    assert not admits(lim)  # two in flight, the limit
    clock.now += INFLIGHT_LEASE_S - 100  # the first lease's last moment
    assert lim.store.inflight("alice") == 2
    clock.now += 1
    assert lim.store.inflight("alice") == 1 and admits(lim)  # admitted: in flight, a lease
    clock.now += 100
    assert lim.store.inflight("alice") == 1  # the second lease ended; the admitted one holds


def test_a_record_ends_a_live_lease_and_a_late_one_ends_nothing_more() -> None:
    clock = Clock(0.0)
    lim = Limiter(MemoryStore(clock, lease_s=30), clock)
    lim.started("alice")
    lim.started("alice")
    lim.finished("alice")  # a record: the oldest lease ends
    assert lim.store.inflight("alice") == 1
    clock.now += 31
    lim.finished("alice")  # its lease ran out before the record came
    assert lim.store.inflight("alice") == 0
    lim.started("alice")
    assert lim.store.inflight("alice") == 1  # not 1 minus the late record


def test_run_out_leases_of_clients_never_seen_again_are_forgotten() -> None:
    leases = Leases(30)
    for n in range(1000):
        leases.add(f"client{n}", 1, now=0.0)
    leases.add("alice", 2, now=20.0)
    leases.purge(now=31.0)
    assert leases.count("alice", 31.0) == 2
    assert leases._held.keys() == {"alice"}  # bounded by the clients in flight


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_leases_end_through_the_shared_store_too(redis: RedisServer) -> None:
    """Replica A's lost records stop counting at A and, at its next sync, at B."""
    clock = Clock(time.time())
    a = RedisStore(redis.url, None, ASLEEP, clock=clock, lease_s=30)
    b = RedisStore(redis.url, None, ASLEEP)
    try:
        a.inflight_add("alice", 1)
        a.inflight_add("alice", 1)
        assert b.inflight("alice") is None  # unread: B follows alice from now on
        a.sync()
        b.sync()
        assert b.inflight("alice") == 2
        clock.now += 31
        assert a.inflight("alice") == 0  # others' count (none) read at A's sync
        a.sync()
        b.sync()
        assert b.inflight("alice") == 0
    finally:
        a.close()
        b.close()
