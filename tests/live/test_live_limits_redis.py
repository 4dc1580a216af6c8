"""Limits that hold across replicas: two gateways sharing one real ``redis-server``.

Each gateway (processor + Envoy) counts locally and syncs with Redis every
``sync_ms`` off the request path, so a client's limit holds over both within
the documented overshoot; with Redis gone, limits behave as configured
(``on_store_error``) and a client's own key is never stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Gateway, RecordingUpstream, credential_route, free_port
from harness.adversary import scrape, write_keys
from harness.fakeapi import anthropic_api
from harness.liveops import metric_sum, poll
from harness.redis import RedisServer

ALICE = "gk-alice-redis-key"
SERVER = "sk-ant-server-redis"
OWN = "sk-ant-api03-own-redis"
MESSAGE = {
    "model": "claude-sonnet-5-5",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "hi"}],
}
SYNC_MS = 50
LIMIT = 8

pytestmark = pytest.mark.slow  # starts real Envoy, processor and redis-server processes


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def limited_gateway(
    start_gateway: Callable[..., Gateway],
    upstream: RecordingUpstream,
    tmp_path: Path,
    redis: RedisServer | None,
    on_store_error: str = "open",
    *,
    rpm: int = LIMIT,
    sync_ms: int = SYNC_MS,
    **options: Any,
) -> tuple[Gateway, int]:
    """A gateway (and its metrics port) whose limits count in ``redis`` (None: in memory)."""
    write_keys(tmp_path / "keys.txt", {"alice": ALICE})
    metrics = free_port()
    top: dict[str, Any] = {
        "metering": True,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "metrics": {"address": "127.0.0.1", "port": metrics},
        "limits": {
            "store": redis.url if redis else "memory",
            "sync_ms": sync_ms,
            "on_store_error": on_store_error,
            "default": {"requests_per_minute": rpm},
        },
    }
    routes = [credential_route("anthropic", upstream.url(), prefix="/anthropic")]
    return start_gateway(routes, env={"ANTHROPIC_KEY": SERVER}, top=top, **options), metrics


def two_gateways(
    start_gateway: Callable[..., Gateway],
    upstream: RecordingUpstream,
    tmp_path: Path,
    redis: RedisServer,
    on_store_error: str = "open",
) -> list[tuple[Gateway, int]]:
    return [
        limited_gateway(start_gateway, upstream, tmp_path, redis, on_store_error) for _ in range(2)
    ]


def post(gateway: Gateway, key: str) -> int:
    return send(gateway, key).status_code


def send(gateway: Gateway, key: str) -> httpx.Response:
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        return client.post("/anthropic/v1/messages", json=MESSAGE, headers={"x-api-key": key})


def away_from_a_minute_boundary(needed_s: float) -> None:
    """Requests-per-minute windows are aligned to the minute: do not let a test straddle one."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.2)


def gauge(port: int, name: str) -> float:
    return metric_sum(scrape(port), name)


def eventually(check: Callable[[], bool]) -> None:
    poll(check, bool, "reached")


def paced(send: Callable[[int], int]) -> int:
    """3 x LIMIT requests, one per two sync intervals; how many were admitted.

    Paced like this every counter has seen the others' counts before the next request: the
    documented overshoot (what other replicas admit in one sync interval) is at most 1.
    """
    away_from_a_minute_boundary(15)
    admitted = 0
    for n in range(3 * LIMIT):
        status = send(n)
        assert status in (200, 429)
        admitted += status == 200
        time.sleep(2 * SYNC_MS / 1000)
    return admitted


def test_a_clients_limit_holds_across_two_gateways(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
    redis: RedisServer,
) -> None:
    upstream = start_upstream("anthropic-upstream", responder=anthropic_api)
    gateways = two_gateways(start_gateway, upstream, tmp_path, redis)
    admitted = paced(lambda n: post(gateways[n % 2][0], ALICE))  # alternating gateways
    assert LIMIT <= admitted <= LIMIT + 1
    assert len(upstream.requests) == admitted
    assert all(post(gateway, OWN) == 200 for gateway, _ in gateways)  # never limited


def test_with_redis_gone_limits_count_locally_and_catch_up_when_it_is_back(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
    redis: RedisServer,
) -> None:
    upstream = start_upstream("anthropic-upstream", responder=anthropic_api)
    (gateway, metrics), _ = two_gateways(start_gateway, upstream, tmp_path, redis)
    away_from_a_minute_boundary(20)
    assert post(gateway, ALICE) == 200
    eventually(lambda: b"credential-gateway:alice:requests" in redis.command("KEYS", "*"))
    key = redis.command("KEYS", "credential-gateway:alice:requests:*").split(b"\r\n")[2].decode()
    eventually(lambda: redis.command("GET", key) == b"$1\r\n1\r\n")
    redis.stop()
    eventually(lambda: gauge(metrics, "gateway_limits_store_up") == 0)
    during = [post(gateway, ALICE) for _ in range(3)]
    assert during == [200, 200, 200]  # fail-open: counted locally, under the limit
    assert post(gateway, OWN) == 200
    redis.start()  # empty: this Redis keeps nothing on disk, so the first count is gone
    eventually(lambda: gauge(metrics, "gateway_limits_store_up") == 1)
    eventually(lambda: redis.command("GET", key) == b"$1\r\n3\r\n")  # what was counted meanwhile


def test_with_redis_gone_and_fail_closed_only_limited_spending_is_refused(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
    redis: RedisServer,
) -> None:
    upstream = start_upstream("anthropic-upstream", responder=anthropic_api)
    (gateway, metrics), _ = two_gateways(start_gateway, upstream, tmp_path, redis, "closed")
    assert post(gateway, ALICE) == 200
    redis.stop()
    eventually(lambda: gauge(metrics, "gateway_limits_store_up") == 0)
    assert post(gateway, ALICE) == 503
    assert post(gateway, OWN) == 200  # a client's own key never waits on the store
    redis.start()
    eventually(lambda: post(gateway, ALICE) == 200)


def test_workers_share_one_limit_through_the_store(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
    redis: RedisServer,
) -> None:
    upstream = start_upstream("anthropic-upstream", responder=anthropic_api)
    gateway, _ = limited_gateway(start_gateway, upstream, tmp_path, redis, extproc={"workers": 2})
    admitted = paced(lambda _: post(gateway, ALICE))  # new connections: both workers get calls
    assert LIMIT <= admitted <= LIMIT + 1
    assert len(upstream.requests) == admitted
    # both workers count through the store (each has its own connection to it)
    assert redis.command("CLIENT", "LIST").count(b"cmd=") >= 3  # 2 workers + this command


def test_a_client_moving_to_a_gateway_that_never_saw_it_gets_one_request_there(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
    redis: RedisServer,
) -> None:
    """requests_per_minute 6, spent through A; then 8 back to back through B. On 7fe3c72 B
    counted alone until its next sync and admitted several; the README's bound is 1."""
    upstream = start_upstream("anthropic-upstream", responder=anthropic_api)
    a, b = (
        limited_gateway(start_gateway, upstream, tmp_path, redis, rpm=6, sync_ms=1000)[0]
        for _ in range(2)
    )
    away_from_a_minute_boundary(25)
    for _ in range(6):  # A's own first sight may ask a request to retry: count admissions
        eventually(lambda: post(a, ALICE) == 200)
    eventually(lambda: b"credential-gateway:alice:requests" in redis.command("KEYS", "*"))
    key = redis.command("KEYS", "credential-gateway:alice:requests:*").split(b"\r\n")[2].decode()
    eventually(lambda: redis.command("GET", key) == b"$1\r\n6\r\n")  # A has pushed its 6
    answers = [send(b, ALICE) for _ in range(8)]
    admitted = sum(r.status_code == 200 for r in answers)
    assert admitted <= 1, [r.status_code for r in answers]
    assert all(r.status_code == 429 and r.headers["retry-after"] for r in answers[admitted:])
    assert len(upstream.requests) == 6 + admitted
    total = f"${len(str(6 + admitted))}\r\n{6 + admitted}\r\n".encode()
    eventually(lambda: redis.command("GET", key) == total)  # B's one request reached the store
    assert post(b, ALICE) == 429
    assert post(b, OWN) == 200  # a client's own key: never limited


def test_with_the_memory_store_the_store_reads_up(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    """Nothing shared to lose: an alert on ``gateway_limits_store_up == 0`` must not fire on a
    healthy gateway (on 7fe3c72 it read 0 with ``store: memory``)."""
    upstream = start_upstream("anthropic-upstream", responder=anthropic_api)
    gateway, metrics = limited_gateway(start_gateway, upstream, tmp_path, None)
    assert post(gateway, ALICE) == 200
    assert gauge(metrics, "gateway_limits_store_up") == 1
