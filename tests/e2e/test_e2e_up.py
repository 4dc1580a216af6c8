"""``python -m extproc up``: both processes from one command, and both gone after SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from harness import RecordingUpstream, base_env, credential_route, free_port, http1
from harness.gateway import ROOT

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes

SERVER_KEY = "sk-ant-api03-server-key-up"
READY_LINE = "gateway ready"


class Up:
    """One ``up`` process with its output in a file."""

    def __init__(self, folder: Path, listener_port: int, upstream: RecordingUpstream) -> None:
        self.listener_port = listener_port
        self.admin_port = free_port()
        config = {
            "listener": {"address": "127.0.0.1", "port": listener_port},
            "admin": {"address": "127.0.0.1", "port": self.admin_port},
            "extproc": {"address": "127.0.0.1", "port": free_port(), "timeout_ms": 5000},
            "routes": [credential_route("anthropic", upstream.url())],
        }
        self.config = folder / "gateway.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.output = folder / "up.log"
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "extproc", "up", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=base_env({"ANTHROPIC_KEY": SERVER_KEY}), cwd=ROOT,
            )  # fmt: skip

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready_or_exit(self, deadline_s: float = 30.0) -> None:
        """Until ``up`` says it is ready or exits; raises if it does neither in time."""
        end = time.monotonic() + deadline_s
        while READY_LINE not in self.text() and self.process.poll() is None:
            if time.monotonic() > end:
                raise AssertionError(f"up neither ready nor exited after {deadline_s:.0f}s")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    name = "up"

    def report(self) -> str:
        return self.text()


@pytest.fixture
def run_up(
    tmp_path: Path, upstream: RecordingUpstream, watch: Callable[..., None]
) -> Iterator[Callable[[int], Up]]:
    """``run_up(listener_port)`` → a started ``up``; SIGTERMed after the test if still running."""
    with ExitStack() as stack:

        def run(listener_port: int) -> Up:
            up = Up(tmp_path, listener_port, upstream)
            watch(up)
            stack.callback(up.stop)
            return up

        yield run


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_up_serves_the_gateway_and_stops_both_processes_on_sigterm(
    run_up: Callable[[int], Up], upstream: RecordingUpstream
) -> None:
    up = run_up(free_port())
    up.wait_ready_or_exit()
    assert up.process.poll() is None, up.text()
    with http1(f"http://127.0.0.1:{up.listener_port}") as client:
        assert client.get("/anthropic/v1/models").status_code == 200
    assert upstream.only_request().values("x-api-key") == [SERVER_KEY.encode()]
    assert up.stop() == 0
    assert not accepts_connections(up.listener_port)
    assert not accepts_connections(up.admin_port)
    assert SERVER_KEY not in up.text()


def test_up_exits_with_an_error_when_the_listener_port_is_taken(
    run_up: Callable[[int], Up],
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        up = run_up(squatter.getsockname()[1])
        up.wait_ready_or_exit()
        assert READY_LINE not in up.text()
        assert up.process.wait(30) != 0
