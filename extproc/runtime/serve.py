"""Run the processor: load the policy, serve ext_proc + health + metrics, reload, stop gracefully.

Health is SERVING only once config and secrets are loaded; SIGTERM turns it
NOT_SERVING first (so Envoy and probes stop sending), then the server stops
with a grace period for the streams in flight. A second health service name,
``CONFIG_HEALTH``, is NOT_SERVING while a broken config change is being
ignored (the last good config still serves).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from extproc.config.load import load_config
from extproc.config.model import ServerKind
from extproc.config.sections import ConfigError
from extproc.policy.secrets import SecretError
from extproc.runtime.reload import PolicyHolder, watch
from extproc.runtime.workers import Supervisor, report_version
from extproc.runtime.xds import XdsWriter
from extproc.server import grpcio_backend, lean_backend
from extproc.server.calls import SERVICE_NAME, Services
from extproc.server.lifecycle import Hooks
from extproc.server.metrics import Metrics
from extproc.usage.limiter import limiter_for

log = logging.getLogger("extproc")
GRACE_SECONDS = 5.0
CONFIG_HEALTH = "credential-gateway.config"


def serve(
    config_path: Path,
    xds_dir: Path | None = None,
    worker_dir: Path | None = None,
    socket: Path | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code.

    With ``extproc.workers`` > 1 this process supervises that many worker
    processes (``worker_dir`` set), which serve on the shared port.
    """
    try:
        config = load_config(config_path).with_socket(socket)
    except ConfigError as exc:
        log.error("config not loaded:\n  %s", "\n  ".join(exc.problems))
        return 2
    if config.extproc.workers > 1 and worker_dir is None:
        return Supervisor(config_path, xds_dir, GRACE_SECONDS).run(config)
    return _serve_one(config_path, xds_dir, worker_dir, socket)


def _serve_one(
    config_path: Path, xds_dir: Path | None, worker_dir: Path | None, socket: Path | None
) -> int:
    metrics = Metrics()
    writer = XdsWriter(xds_dir) if xds_dir else None
    on_loaded = writer.write if writer else None
    holder = PolicyHolder(config_path, metrics, on_loaded=on_loaded, socket=socket)
    if not holder.load():
        return 2
    config = holder.config
    assert config is not None
    settings = config.extproc
    if config.metrics is not None and worker_dir is None:
        metrics.serve(config.metrics)
    health: lean_backend.Health | grpcio_backend.GrpcioHealth
    health = (
        lean_backend.Health()
        if settings.server is ServerKind.LEAN
        else grpcio_backend.GrpcioHealth()
    )
    stop_watching = threading.Event()

    def reload() -> bool:
        ok = holder.load()
        health.set(CONFIG_HEALTH, ok)
        if worker_dir is not None:
            report_version(worker_dir, holder.policy.version)
        return ok

    def on_started() -> None:
        for service in ("", SERVICE_NAME, CONFIG_HEALTH):
            health.set(service, True)
        log.info("ext_proc (%s) on %s", settings.server.value, settings.where)
        if worker_dir is not None:  # the supervisor watches the files and sends SIGHUP
            report_version(worker_dir, holder.policy.version)
        else:
            watcher = threading.Thread(
                target=watch, args=(holder, stop_watching, reload), daemon=True
            )
            watcher.start()

    def on_reload_signal() -> None:
        threading.Thread(target=reload, name="reload", daemon=True).start()

    hooks = Hooks(on_started, on_reload_signal, GRACE_SECONDS)
    try:
        limiter = limiter_for(config.limits, os.environ, metrics.store_synced)
    except SecretError as exc:
        log.error("limits store password: %s", exc)
        return 2
    services = Services(holder, metrics, limiter)
    if isinstance(health, lean_backend.Health):
        code = lean_backend.run(settings, services=services, health=health, hooks=hooks)
    else:
        code = grpcio_backend.run(settings, services=services, health=health, hooks=hooks)
    if limiter is not None:
        limiter.close()
    stop_watching.set()
    log.info("ext_proc stopped")
    return code
