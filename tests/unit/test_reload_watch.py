"""The watcher and SIGHUP share one PolicyHolder: a change is loaded once, not by both;
and a watcher that is stuck or gone shows in the config health service."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from extproc.config.model import ServerKind
from extproc.runtime.reload import WATCH_LIMIT, PolicyHolder, fingerprint, watch
from extproc.runtime.serve import CONFIG_HEALTH, _Run
from extproc.runtime.status import STUCK_SECONDS
from extproc.server.lean_backend import Health
from extproc.server.metrics import Metrics

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - {name: plain, prefix: /plain, upstream: 'http://127.0.0.1:1'}
"""


def loaded_by_the_watcher(holder: PolicyHolder, change: Callable[[], None]) -> list[bool]:
    """The watcher's loads (their results) while ``change`` happens, then for 0.6 s."""
    loads: list[bool] = []
    stop = threading.Event()

    def load() -> bool:
        loads.append(holder.load())
        return True

    thread = threading.Thread(target=watch, args=(holder, stop, load, 0.05))
    thread.start()
    try:
        time.sleep(0.1)  # the watcher has read the files once
        change()
        time.sleep(0.6)  # several polls and a settle
    finally:
        stop.set()
        thread.join(5)
    return loads


def holder_for(tmp_path: Path) -> tuple[PolicyHolder, Path]:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    holder = PolicyHolder(path, Metrics(), environ={})
    assert holder.load()
    return holder, path


def test_a_change_a_sighup_loaded_is_not_loaded_again_by_the_watcher(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)

    def edit_then_sighup() -> None:
        path.write_text(CONFIG.replace("/plain", "/plain2"))
        assert holder.load()

    assert loaded_by_the_watcher(holder, edit_then_sighup) == []
    assert holder.config is not None and holder.config.routes[0].prefix == "/plain2/"


def test_a_change_nobody_loaded_is_loaded_once_by_the_watcher(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)
    loads = loaded_by_the_watcher(holder, lambda: path.write_text(CONFIG.replace("/plain", "/p3")))
    assert loads == [True]
    assert holder.config is not None and holder.config.routes[0].prefix == "/p3/"


def test_a_broken_change_a_sighup_tried_is_not_tried_again(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)

    def break_then_sighup() -> None:
        path.write_text("listener: [\n")
        assert not holder.load()  # reported once, by the SIGHUP's attempt

    assert loaded_by_the_watcher(holder, break_then_sighup) == []


def config_health(run: _Run) -> int:
    assert isinstance(run.health, Health)
    reply, _code, _details = run.health.check(
        health_pb2.HealthCheckRequest(service=CONFIG_HEALTH).SerializeToString()
    )
    assert reply is not None
    return int(health_pb2.HealthCheckResponse.FromString(reply).status)


def test_a_stuck_or_dead_watcher_turns_the_config_health_service_not_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # the status record goes here
    holder, _path = holder_for(tmp_path)
    run = _Run(holder, None, ServerKind.LEAN)
    run.watcher.start()  # a live watcher, polling every second
    try:
        run.config_healthy()
        assert config_health(run) == SERVING
        holder.watched_at -= STUCK_SECONDS + 1  # its last round began too long ago
        run.config_healthy()
        assert config_health(run) == NOT_SERVING
    finally:
        run.stop.set()
        run.watcher.join(5)
    holder.watched_at = time.monotonic()
    run.config_healthy()  # fresh heartbeat, but the thread is gone
    assert config_health(run) == NOT_SERVING


def test_a_fifo_or_a_huge_file_among_the_watched_ones_never_hangs_the_watcher(
    tmp_path: Path,
) -> None:
    """A keys or secret file replaced by a FIFO would block ``read_bytes`` forever."""
    fifo = tmp_path / "keys.txt"
    os.mkfifo(fifo)
    huge = tmp_path / "secret"
    with huge.open("wb") as handle:
        handle.truncate(WATCH_LIMIT + 1)  # sparse: no disk used
    done = threading.Event()
    digests: list[bytes] = []

    def run() -> None:
        digests.append(fingerprint([fifo, huge]))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "fingerprint blocked on a FIFO"
    with huge.open("ab") as handle:
        handle.write(b"x")
    assert fingerprint([fifo, huge]) != digests[0]  # a change past the bound is still seen
