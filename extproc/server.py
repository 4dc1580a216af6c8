"""Run the processor: load the policy, serve ext_proc + health + metrics, reload, stop gracefully.

Health is SERVING only once config and secrets are loaded; SIGTERM turns it
NOT_SERVING first (so Envoy and probes stop sending), then the server stops
with a grace period for the streams in flight. A second health service name,
``CONFIG_HEALTH``, is NOT_SERVING while a broken config change is being
ignored (the last good config still serves).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Protocol

from extproc import grpcio_backend, lean_backend
from extproc.metrics import Metrics
from extproc.model import ServerKind
from extproc.reload import PolicyHolder, watch
from extproc.servicer import SERVICE_NAME
from extproc.xds import XdsWriter

log = logging.getLogger("extproc")
GRACE_SECONDS = 5.0
CONFIG_HEALTH = "credential-gateway.config"


class Health(Protocol):
    def set(self, service: str, serving: bool) -> None: ...


def _reload_loop(holder: PolicyHolder, health: Health, stop: threading.Event) -> None:
    """Watch files; after each reload attempt, publish whether the latest change applied."""

    def load_and_report() -> bool:
        ok = holder.load()
        health.set(CONFIG_HEALTH, ok)
        return ok

    watch(holder, stop, load=load_and_report)


def serve(config_path: Path, xds_dir: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    metrics = Metrics()
    writer = XdsWriter(xds_dir) if xds_dir else None
    holder = PolicyHolder(config_path, metrics, on_loaded=writer.write if writer else None)
    if not holder.load():
        return 2
    config = holder.config
    assert config is not None
    settings = config.extproc
    if config.metrics is not None:
        metrics.serve(config.metrics)
    stop_watching = threading.Event()
    health: lean_backend.Health | grpcio_backend.GrpcioHealth
    health = (
        lean_backend.Health()
        if settings.server is ServerKind.LEAN
        else grpcio_backend.GrpcioHealth()
    )

    def on_started() -> None:
        for service in ("", SERVICE_NAME, CONFIG_HEALTH):
            health.set(service, True)
        log.info(
            "ext_proc (%s) listening on %s:%d",
            settings.server.value,
            settings.address,
            settings.port,
        )
        threading.Thread(
            target=_reload_loop, args=(holder, health, stop_watching), name="reload", daemon=True
        ).start()

    if isinstance(health, lean_backend.Health):
        code = lean_backend.run(
            settings,
            source=holder,
            metrics=metrics,
            health=health,
            on_started=on_started,
            grace_s=GRACE_SECONDS,
        )
    else:
        code = grpcio_backend.run(
            settings,
            source=holder,
            metrics=metrics,
            health=health,
            on_started=on_started,
            grace_s=GRACE_SECONDS,
        )
    stop_watching.set()
    log.info("ext_proc stopped")
    return code
