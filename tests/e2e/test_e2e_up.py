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

    def __init__(
        self,
        folder: Path,
        listener_port: int,
        upstream: RecordingUpstream,
        top: dict[str, object] | None = None,
    ) -> None:
        self.listener_port = listener_port
        self.admin_port = free_port()
        config = {
            "listener": {"address": "127.0.0.1", "port": listener_port},
            "admin": {"address": "127.0.0.1", "port": self.admin_port},
            "extproc": {"address": "127.0.0.1", "port": free_port(), "timeout_ms": 5000},
            "routes": [credential_route("anthropic", upstream.url())],
            **(top or {}),
        }
        folder.mkdir(parents=True, exist_ok=True)
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
) -> Iterator[Callable[..., Up]]:
    """``run_up(listener_port)`` → a started ``up``; SIGTERMed after the test if still running.

    Each ``up`` has its own folder (and so its own YAML and state).
    """
    with ExitStack() as stack:
        count = iter(range(100))

        def run(listener_port: int, top: dict[str, object] | None = None) -> Up:
            up = Up(tmp_path / f"up{next(count)}", listener_port, upstream, top)
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
    run_up: Callable[..., Up], upstream: RecordingUpstream
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
    run_up: Callable[..., Up],
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        up = run_up(squatter.getsockname()[1])
        up.wait_ready_or_exit()
        assert READY_LINE not in up.text()
        assert up.process.wait(30) != 0


def assert_refused_in_one_line(up: Up, needle: str) -> None:
    """``up`` exited non-zero with one line naming ``needle``, and no traceback."""
    assert up.process.wait(30) != 0
    text = up.text()
    assert READY_LINE not in text
    assert "Traceback" not in text, text
    assert len([line for line in text.splitlines() if needle in line]) == 1, text


def test_a_second_up_on_a_taken_listener_port_refuses_to_start_and_the_first_keeps_it(
    run_up: Callable[..., Up], upstream: RecordingUpstream
) -> None:
    first = run_up(free_port())
    first.wait_ready_or_exit()
    assert first.process.poll() is None, first.text()
    second = run_up(first.listener_port)
    second.wait_ready_or_exit()
    assert_refused_in_one_line(second, f"listener port {first.listener_port}")
    for _ in range(10):  # every connection reaches the first gateway (no SO_REUSEPORT split)
        with http1(f"http://127.0.0.1:{first.listener_port}") as client:
            assert client.get("/anthropic/v1/models").status_code == 200
    assert len(upstream.requests) == 10


@pytest.mark.parametrize("role", ["admin", "metrics", "extproc"])
def test_up_refuses_a_taken_admin_metrics_or_extproc_port_in_one_line_without_a_traceback(
    run_up: Callable[..., Up], role: str
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        endpoint = {"address": "127.0.0.1", "port": port}
        if role == "extproc":  # a TCP port only with workers (else up uses a private socket)
            endpoint |= {"workers": 2, "timeout_ms": 5000}
        up = run_up(free_port(), {role: endpoint})
        up.wait_ready_or_exit()
        assert_refused_in_one_line(up, f"{role} port {port}")


def test_serve_with_a_taken_metrics_port_exits_with_one_line_and_no_traceback(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        up = Up(
            tmp_path, free_port(), upstream, {"metrics": {"address": "127.0.0.1", "port": port}}
        )
        up.process.kill()
        up.process.wait()
        done = subprocess.run(
            [sys.executable, "-m", "extproc", "serve", str(up.config)],
            capture_output=True, text=True, env=base_env({"ANTHROPIC_KEY": SERVER_KEY}),
            cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if f"metrics port 127.0.0.1:{port}" in line]


def extproc_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        capture_output=True, text=True, env=base_env(), cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip


def test_health_and_status_reach_the_processor_of_a_running_up(
    run_up: Callable[..., Up],
) -> None:
    up = run_up(free_port())
    up.wait_ready_or_exit()
    assert up.process.poll() is None, up.text()
    health = extproc_command("health", str(up.config))
    assert health.returncode == 0, health.stderr
    assert health.stdout.startswith("SERVING")
    status = extproc_command("status", str(up.config))
    assert status.returncode == 0, status.stdout + status.stderr
    version = next(
        line.split("config version ")[1].split(",")[0]
        for line in status.stdout.splitlines()
        if line.startswith("  config version")
    )
    assert f"envoy: config version cds {version}, rds {version}, lds {version}" in status.stdout
    assert "routes 1, gateway clients 0" in status.stdout
    assert "in step: yes" in status.stdout
    assert SERVER_KEY not in status.stdout
    assert up.stop() == 0
    after = extproc_command("health", str(up.config))
    assert after.returncode != 0


def test_up_with_workers_serves_and_reports_one_version_in_processor_and_envoy(
    run_up: Callable[..., Up], upstream: RecordingUpstream
) -> None:
    extproc = {"address": "127.0.0.1", "port": free_port(), "timeout_ms": 5000, "workers": 2}
    up = run_up(free_port(), {"extproc": extproc})
    up.wait_ready_or_exit()
    assert up.process.poll() is None, up.text()
    with http1(f"http://127.0.0.1:{up.listener_port}") as client:
        assert client.get("/anthropic/v1/models").status_code == 200
    status = extproc_command("status", str(up.config))
    assert "in step: yes" in status.stdout, status.stdout + status.stderr
    assert up.stop() == 0
