"""``extproc.workers: 2``: two processor processes on one port behave as one processor."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Gateway, RecordingUpstream, credential_route, free_port, http1

pytestmark = pytest.mark.slow


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def worker_pids(gateway: Gateway) -> list[int]:
    assert gateway.extproc_process is not None
    children = Path(
        f"/proc/{gateway.extproc_process.pid}/task/{gateway.extproc_process.pid}/children"
    )
    return [int(pid) for pid in children.read_text().split()]


def wait_for(condition: Callable[[], bool], deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def test_two_workers_inject_reload_together_and_sum_their_metrics(
    tmp_path: Path, upstream: RecordingUpstream, start_gateway: Callable[..., Gateway]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-first\n")
    metrics_port = free_port()
    gateway = start_gateway(
        [credential_route("a", upstream.url(), {"file": str(key_file)})],
        extproc={"workers": 2},
        top={"metrics": {"address": "127.0.0.1", "port": metrics_port}},
    )
    assert len(worker_pids(gateway)) == 2
    for _ in range(20):
        with http1(gateway.base_url) as client:  # a new connection each time
            assert client.get("/a/x").status_code == 200
    assert {r.values("x-api-key")[0] for r in upstream.requests} == {b"sk-first"}
    assert 'gateway_decisions_total{client="",outcome="injected",route="a"} 20.0' in metrics_text(
        metrics_port
    )

    key_file.write_text("sk-second\n")
    with http1(gateway.base_url) as client:

        def rotated() -> bool:
            upstream.clear()
            assert client.get("/a/x").status_code == 200
            return upstream.only_request().values("x-api-key") == [b"sk-second"]

        wait_for(rotated)
        upstream.clear()
        for _ in range(20):  # every worker has the new key, whichever answers
            assert client.get("/a/x").status_code == 200
    assert {r.values("x-api-key")[0] for r in upstream.requests} == {b"sk-second"}


def test_a_dead_worker_is_replaced(
    upstream: RecordingUpstream, start_gateway: Callable[..., Gateway]
) -> None:
    gateway = start_gateway(
        [credential_route("a", upstream.url())], env={"A_KEY": "k"}, extproc={"workers": 2}
    )
    victim, survivor = worker_pids(gateway)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in worker_pids(gateway) and len(worker_pids(gateway)) == 2)
    assert survivor in worker_pids(gateway)
    with http1(gateway.base_url) as client:
        wait_for(lambda: client.get("/a/x").status_code == 200)
