"""``up``: the ext_proc service and Envoy together, started and stopped in order.

Start: every port checked free (``ports``), then the processor (it writes
Envoy's route and cluster files into the run folder and rewrites them whenever
the YAML changes), and Envoy only once the processor serves, so no request
meets a missing processor. Stop: Envoy first (its listener closes at once,
streams in flight finish), then the processor.

This process never loads gRPC: it learns that the processor serves from the
record the processor writes in the config's state folder (``state``), so
Envoy, forked from here, can inherit no gRPC thread or descriptor (and children
get only stdin/stdout/stderr). ``up`` records its pid and the processor's
private socket there too, for ``health`` and ``status``.

A processor that dies is started again, at once the first time and then with
a growing delay while it keeps dying (``processes.Backoff``, as the workers
supervisor does); Envoy keeps running meanwhile and answers requests that
need the processor with its ``failure_mode`` (503 when closed). If Envoy dies,
everything stops and ``up`` exits 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig
from extproc.render import render_yaml
from extproc.runtime import processes, state
from extproc.runtime.ports import PortTaken, check_free, gateway_ports

log = logging.getLogger("up")
DRAIN_SECONDS = 300.0  # how long streaming responses in flight may run on after Ctrl-C/SIGTERM
WATCH_INTERVAL_S = 0.2  # how often the children are looked at


def banner(config: GatewayConfig) -> str:
    scheme = "https" if config.listener.tls else "http"
    host = (
        "localhost"
        if config.listener.address in ("0.0.0.0", "::", "127.0.0.1")
        else config.listener.address
    )
    base = f"{scheme}://{host}:{config.listener.port}"
    lines = ["gateway ready:"]
    for route in config.routes:
        lines.append(f"  {base}{route.prefix}  →  {'https' if route.upstream.tls else 'http'}://"
                     f"{route.upstream.authority}{route.upstream.path}")  # fmt: skip
    first = config.routes[0].prefix.rstrip("/")
    lines.append(f"Claude Code:  export ANTHROPIC_BASE_URL={base}{first}")
    return "\n".join(lines)


def up(config_path: Path, envoy: str = "envoy", drain_seconds: float = DRAIN_SECONDS) -> int:
    config = load_config(config_path)
    # The processor's answers carry the key: on a shared host only we may reach it. A
    # socket in our private folder does that; several workers need a TCP port instead.
    private = config.extproc.socket is None and config.extproc.workers == 1
    try:
        envoy_binary = processes.find_envoy(envoy)
        check_free([p for p in gateway_ports(config) if not (private and p[0] == "extproc")])
    except (processes.NotReady, PortTaken) as exc:
        log.error("%s", exc)
        return 1
    run_dir = Path(tempfile.mkdtemp(prefix="credential-gateway-"))  # mode 0700: ours alone
    try:
        return _run(
            config_path, config, run_dir=run_dir, private=private,
            envoy_binary=envoy_binary, drain_seconds=drain_seconds,
        )  # fmt: skip
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        state.remove_state(config_path, state.UP_FILE)


def _run(
    config_path: Path,
    config: GatewayConfig,
    *,
    run_dir: Path,
    private: bool,
    envoy_binary: str,
    drain_seconds: float,
) -> int:
    xds_dir = run_dir / "xds"
    socket = run_dir / "extproc.sock" if private else None
    config = config.with_socket(socket)
    bootstrap = run_dir / "envoy.yaml"
    bootstrap.write_text(render_yaml(config, xds_dir))
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serve = [sys.executable, "-m", "extproc", "serve", str(config_path), "--xds-dir", str(xds_dir)]
    serve += ["--socket", str(socket)] if socket else []
    state.write_state(
        config_path, state.UP_FILE, {"pid": os.getpid(), "target": config.extproc.target}
    )
    processor = Processor(serve, config_path)
    envoy_process: subprocess.Popen[bytes] | None = None
    try:
        processor.wait_serving(30)
        envoy_process = processes.start_child(processes.envoy_command(envoy_binary, bootstrap))
        processes.wait_envoy_ready(config.admin, 30, envoy_process)
        processes.wait_listening(config.admin, config.listener.port, 10, envoy_process)
        print(banner(config), flush=True)
        while not stopping.wait(WATCH_INTERVAL_S):
            if envoy_process.poll() is not None:
                log.error(
                    "envoy exited with code %s; stopping the processor", envoy_process.returncode
                )
                return 1
            processor.check(time.monotonic())
        return 0
    except processes.NotReady as exc:
        log.error("%s", exc)
        return 1
    finally:
        if envoy_process is not None:
            processes.drain_envoy(config.admin, drain_seconds)
            processes.stop(envoy_process)
        processes.stop(processor.process)


class Processor:
    """The processor child of ``up``: restarted with backoff when it dies, and logged.

    ``check`` never blocks for long: Envoy is watched in the same loop. That
    the processor serves is read from its state record, not asked over gRPC.
    """

    def __init__(self, command: list[str], config_path: Path) -> None:
        self.command = command
        self.config_path = config_path
        self.process = processes.start_child(command)
        self.backoff = processes.Backoff()
        self._down_logged = False
        self._starting = False  # restarted, not yet seen serving

    def serving(self) -> bool:
        record = state.read_state(self.config_path, state.PROCESSOR_FILE)
        return bool(record and record.get("pid") == self.process.pid and record.get("serving"))

    def wait_serving(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while not self.serving():
            if self.process.poll() is not None:
                raise processes.NotReady(
                    f"ext_proc service exited with code {self.process.returncode}"
                )
            if time.monotonic() > end:
                raise processes.NotReady(f"ext_proc service not serving after {deadline_s:.0f}s")
            time.sleep(0.05)

    def check(self, now: float) -> subprocess.Popen[bytes]:
        """Restart the processor if it died and its backoff allows; returns the current child."""
        if self.process.poll() is None:
            if self._starting and self.serving():
                self._starting = False
                log.info("processor %d is serving again", self.process.pid)
            return self.process
        wait_s = self.backoff.wait_s(now)
        if not self._down_logged:
            self._down_logged = True
            log.error(
                "processor %d exited with code %s; Envoy answers the requests that need it "
                "per failure_mode until it is back; restarting it%s",
                self.process.pid,
                self.process.returncode,
                f" in {wait_s:.1f}s" if wait_s else "",
            )
        if wait_s > 0:
            return self.process
        self.backoff.restarted(now)
        self.process = processes.start_child(self.command)
        self._down_logged = False
        self._starting = True
        return self.process
