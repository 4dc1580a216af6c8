"""``up``: the ext_proc service and Envoy together, started and stopped in order.

Start: the processor first (it writes Envoy's route and cluster files into the
run folder and rewrites them whenever the YAML changes), and Envoy only once
the processor is SERVING, so no request meets a missing processor. Stop: Envoy
first (its listener closes at once, streams in flight finish), then the
processor. If either dies, the other is stopped too.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig
from extproc.render import render_yaml
from extproc.runtime import processes

log = logging.getLogger("up")
DRAIN_SECONDS = 300.0  # how long streaming responses in flight may run on after Ctrl-C/SIGTERM


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
    envoy_binary = processes.find_envoy(envoy)
    run_dir = Path(tempfile.mkdtemp(prefix="credential-gateway-"))  # mode 0700: ours alone
    xds_dir = run_dir / "xds"
    # The processor's answers carry the key: on a shared host only we may reach it. A
    # socket in our private folder does that; several workers need a TCP port instead.
    private = config.extproc.socket is None and config.extproc.workers == 1
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
    extproc = processes.start_child(serve)
    envoy_process: subprocess.Popen[bytes] | None = None
    try:
        processes.wait_serving(config.extproc.target, 30, extproc)
        envoy_process = processes.start_child(processes.envoy_command(envoy_binary, bootstrap))
        processes.wait_envoy_ready(config.admin, 30, envoy_process)
        processes.wait_listening(config.admin, config.listener.port, 10, envoy_process)
        print(banner(config), flush=True)
        while not stopping.wait(0.2):
            if extproc.poll() is not None or envoy_process.poll() is not None:
                log.error("a gateway process exited; stopping the other")
                return 1
        return 0
    except processes.NotReady as exc:
        log.error("%s", exc)
        return 1
    finally:
        if envoy_process is not None:
            processes.drain_envoy(config.admin, drain_seconds)
            processes.stop(envoy_process)
        processes.stop(extproc)
        shutil.rmtree(run_dir, ignore_errors=True)
