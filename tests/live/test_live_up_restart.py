"""``python -m extproc up`` when one of its two children dies.

A dead processor is started again (at once, then with a growing delay while
it keeps dying) and Envoy stays the same process throughout: requests that
need the processor get Envoy's 503 while it is down and never reach the
upstream, and the key is injected again once it is back. A dead Envoy ends
``up`` with a non-zero code and takes the processor with it.

To hold the processor down for as long as the test needs, without racing its
restart, one test breaks the YAML first: the running processor keeps its
config, but every restart fails on the broken file until it is repaired.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from harness import RecordingUpstream, http1
from harness.liveops import (
    DEADLINE_S,
    Child,
    UpProcess,
    children,
    poll,
    running_up,
    write_atomically,
)

SERVER_KEY = "sk-ant-api03-up-restart-server-key"
PATH = "/anthropic/v1/messages"
DEAD_PROCESSOR = "processor {pid} exited with code"

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


@pytest.fixture
def up(
    tmp_path: Path, upstream: RecordingUpstream, watch: Callable[..., None]
) -> Iterator[UpProcess]:
    with running_up(tmp_path / "up", upstream, watch, SERVER_KEY) as process:
        yield process


def child(up: UpProcess, is_envoy: bool) -> Child:
    """The one live child of ``up`` that is Envoy, or the processor (``-m extproc serve``)."""
    assert up.process is not None
    found = [
        c
        for c in children(up.process.pid)
        if (" -m extproc serve " not in c.command) == is_envoy and c.alive()
    ]
    assert len(found) == 1, found
    return found[0]


def kill(process: Child) -> None:
    os.kill(process.pid, signal.SIGKILL)
    poll(process.alive, lambda alive: not alive, f"process {process.pid} gone after SIGKILL")


def post(up: UpProcess) -> httpx.Response:
    """A request without a credential: it needs the processor to get the server key."""
    with http1(up.base_url) as client:
        reply: httpx.Response = client.post(PATH, json={"model": "m", "messages": []})
    return reply


def wait_key_injected(up: UpProcess, upstream: RecordingUpstream, deadline_s: float) -> None:
    """Poll with credential-less requests until one is answered 200 by the upstream."""
    upstream.clear()
    reply = poll(lambda: post(up), lambda r: r.status_code == 200, "200 again", deadline_s)
    assert reply.status_code == 200
    assert [r.values("x-api-key") for r in upstream.requests][-1] == [SERVER_KEY.encode()]


def test_a_killed_processor_is_restarted_and_the_same_envoy_injects_the_key_again(
    up: UpProcess, upstream: RecordingUpstream
) -> None:
    envoy, processor = child(up, is_envoy=True), child(up, is_envoy=False)
    assert post(up).status_code == 200
    kill(processor)
    wait_key_injected(up, upstream, DEADLINE_S)
    # While it was down, requests got 503 from Envoy; none reached the upstream without the key.
    assert all(r.values("x-api-key") == [SERVER_KEY.encode()] for r in upstream.requests)
    assert envoy.alive(), "Envoy was restarted or stopped"
    assert child(up, is_envoy=False).pid != processor.pid
    assert DEAD_PROCESSOR.format(pid=processor.pid) in up.output()
    assert up.process is not None and up.process.poll() is None


def test_while_the_processor_cannot_come_back_requests_fail_closed_until_it_can(
    up: UpProcess, upstream: RecordingUpstream
) -> None:
    envoy, processor = child(up, is_envoy=True), child(up, is_envoy=False)
    good_yaml = up.config_path.read_bytes()
    write_atomically(up.config_path, b"routes: [")  # the running processor keeps its config
    kill(processor)
    poll(
        lambda: up.output().count("exited with code 2"),
        lambda failed: failed >= 2,
        "two restarts that failed on the broken YAML",
    )
    upstream.clear()
    for _ in range(3):
        reply = post(up)
        assert reply.status_code == 503, reply.text
        assert reply.json()["type"] == "error"
    assert upstream.requests == []
    write_atomically(up.config_path, good_yaml)
    # The next restart is due within the backoff reached so far (2 s, then 4 s).
    wait_key_injected(up, upstream, DEADLINE_S * 2)
    assert envoy.alive(), "Envoy was restarted or stopped"
    assert up.process is not None and up.process.poll() is None


def test_when_envoy_dies_up_stops_the_processor_and_exits_non_zero(up: UpProcess) -> None:
    envoy, processor = child(up, is_envoy=True), child(up, is_envoy=False)
    kill(envoy)
    assert up.wait(DEADLINE_S) != 0
    assert not processor.alive()
    assert "envoy exited" in up.output()
