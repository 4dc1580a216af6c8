"""``extproc.workers: 2``: two processor processes on one port behave as one processor."""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Gateway, RecordingUpstream, credential_route, free_port, http1

from extproc.runtime.workers import DECISION_FILE, Supervisor

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


def test_a_dead_workers_gauges_leave_the_sum_at_once(
    tmp_path: Path, upstream: RecordingUpstream, start_gateway: Callable[..., Gateway]
) -> None:
    """A worker that died holding ``last_reload_success 0`` does not pin the sum at 0."""
    metrics_port = free_port()
    gateway = start_gateway(
        [credential_route("a", upstream.url())],
        env={"A_KEY": "k"},
        extproc={"workers": 2},
        top={"metrics": {"address": "127.0.0.1", "port": metrics_port}},
    )
    good = gateway.config_path.read_text()

    def last_reload_ok() -> str:
        line = "gateway_config_last_reload_success "
        return next(x for x in metrics_text(metrics_port).splitlines() if x.startswith(line))

    broken = gateway.config_path.with_suffix(".broken")
    broken.write_text(good + "  - [not closed\n")
    broken.replace(gateway.config_path)
    wait_for(lambda: last_reload_ok().endswith(" 0.0"))
    victim, _survivor = worker_pids(gateway)
    os.kill(victim, signal.SIGKILL)  # dies with its 0; its successor fails to load meanwhile
    wait_for(lambda: victim not in worker_pids(gateway))
    gateway.reconfigure()  # the good YAML again
    wait_for(lambda: len(worker_pids(gateway)) == 2 and last_reload_ok().endswith(" 1.0"), 30)


def test_sighup_at_any_moment_of_a_workers_start_is_safe(tmp_path: Path) -> None:
    """SIGHUP from the moment the worker process exists: it starts, serves and reloads."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"listener: {{address: 127.0.0.1, port: {free_port()}}}\n"
        f"extproc: {{address: 127.0.0.1, port: {free_port()}, workers: 2}}\n"
        "routes:\n  - {name: plain, prefix: /p, upstream: 'http://127.0.0.1:1'}\n"
    )
    supervisor = Supervisor(config, None, 1.0)
    worker = supervisor._start()
    report = supervisor.run_dir / f"{worker.pid}.version"
    try:
        end = time.monotonic() + 30
        while not report.exists():  # one SIGHUP every few ms through the whole start
            assert worker.poll() is None, f"worker died of SIGHUP (code {worker.returncode})"
            assert time.monotonic() < end, "worker never reported its version"
            worker.send_signal(signal.SIGHUP)
            time.sleep(0.005)
        # Answer as the supervisor would: the staged config (the same one) may be committed.
        (supervisor.run_dir / DECISION_FILE).write_text(f"commit {report.read_text()}")
        report.unlink()
        worker.send_signal(signal.SIGHUP)  # taken by the handler: the worker reports again
        wait_for(lambda: report.exists() or worker.poll() is not None)
        assert worker.poll() is None, f"worker died of SIGHUP (code {worker.returncode})"
    finally:
        worker.terminate()
        worker.wait(10)
        shutil.rmtree(supervisor.run_dir, ignore_errors=True)


def test_workers_keep_the_old_key_while_envoy_cannot_take_the_change_and_all_switch_on_retry(
    tmp_path: Path, upstream: RecordingUpstream, start_gateway: Callable[..., Gateway]
) -> None:
    """A reload over workers is one transaction: staged everywhere, committed only with Envoy."""
    key_file = tmp_path / "key"
    key_file.write_text("sk-first\n")
    metrics_port = free_port()
    gateway = start_gateway(
        [credential_route("a", upstream.url(), {"file": str(key_file)})],
        extproc={"workers": 2},
        top={"metrics": {"address": "127.0.0.1", "port": metrics_port}},
    )
    assert gateway.xds_dir is not None
    routes_file = gateway.xds_dir / "rds.json"
    kept = routes_file.with_name("rds.kept")
    routes_file.replace(kept)
    routes_file.mkdir()  # no write of Envoy's routes can succeed (even as root)
    key_file.write_text("sk-second\n")
    wait_for(lambda: "gateway_config_last_reload_success 0.0" in metrics_text(metrics_port))
    upstream.clear()
    for _ in range(20):
        with http1(gateway.base_url) as client:  # a new connection each time: both workers
            assert client.get("/a/x").status_code == 200
    assert {r.values("x-api-key")[0] for r in upstream.requests} == {b"sk-first"}

    routes_file.rmdir()
    kept.replace(routes_file)
    with http1(gateway.base_url) as client:

        def rotated() -> bool:
            upstream.clear()
            assert client.get("/a/x").status_code == 200
            return upstream.only_request().values("x-api-key") == [b"sk-second"]

        wait_for(rotated, 60)
    upstream.clear()
    for _ in range(20):
        with http1(gateway.base_url) as client:
            assert client.get("/a/x").status_code == 200
    assert {r.values("x-api-key")[0] for r in upstream.requests} == {b"sk-second"}
