"""Run the processor: load the policy, serve gRPC + health + metrics, reload, stop gracefully.

Health is SERVING only once config and secrets are loaded; SIGTERM turns it
NOT_SERVING first (so Envoy and probes stop sending), then the server stops
with a grace period for the streams in flight. A second health service name,
``CONFIG_HEALTH``, is NOT_SERVING while a broken config change is being
ignored (the last good config still serves).
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.metrics import Metrics
from extproc.reload import PolicyHolder, watch
from extproc.servicer import SERVICE_NAME, ExternalProcessor
from extproc.xds import XdsWriter

log = logging.getLogger("extproc")
GRACE_SECONDS = 5.0
CONFIG_HEALTH = "credential-gateway.config"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def build_server(
    holder: PolicyHolder, metrics: Metrics, threads: int, reuse_port: bool
) -> tuple[grpc.Server, health.HealthServicer]:
    """A gRPC server with the processor and the health service registered (not started)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="extproc"),
        options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
    )
    server.add_generic_rpc_handlers([ExternalProcessor(holder, metrics).handler()])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def _reload_loop(
    holder: PolicyHolder, health_servicer: health.HealthServicer, stop: threading.Event
) -> None:
    """Watch files; after each reload attempt, publish whether the latest change applied."""

    def load_and_report() -> bool:
        ok = holder.load()
        health_servicer.set(CONFIG_HEALTH, _SERVING if ok else _NOT_SERVING)
        return ok

    watch(holder, stop, load=load_and_report)


def serve(config_path: Path, xds_dir: Path | None = None, threads: int = 16) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    metrics = Metrics()
    writer = XdsWriter(xds_dir) if xds_dir else None
    holder = PolicyHolder(config_path, metrics, on_loaded=writer.write if writer else None)
    if not holder.load():
        return 2
    config = holder.config
    assert config is not None
    server, health_servicer = build_server(holder, metrics, threads, config.extproc.workers > 1)
    address = f"{config.extproc.address}:{config.extproc.port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError:
        log.error("cannot listen on %s (port in use?)", address)
        return 1
    if config.metrics is not None:
        metrics.serve(config.metrics)
    server.start()
    for service in ("", SERVICE_NAME, CONFIG_HEALTH):
        health_servicer.set(service, _SERVING)
    log.info("ext_proc listening on %s", address)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        log.info("%s: NOT_SERVING, stopping within %.0fs", name, GRACE_SECONDS)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watcher = threading.Thread(
        target=_reload_loop, args=(holder, health_servicer, stopping), name="reload", daemon=True
    )
    watcher.start()
    stopping.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(GRACE_SECONDS).wait()
    log.info("ext_proc stopped")
    return 0
