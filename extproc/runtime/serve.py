"""Run the processor: load the policy, serve ext_proc + health + metrics, reload, stop gracefully.

Health is SERVING only once config and secrets are loaded; SIGTERM turns it
NOT_SERVING first (so Envoy and probes stop sending), then the server stops
with a grace period for the streams in flight. A second health service name,
``CONFIG_HEALTH``, is NOT_SERVING while a broken config change is being
ignored or could not be delivered to Envoy (the last good config still
serves), and while the config watcher is stuck (no round for
``status.STUCK_SECONDS``) or gone. The processor records what it serves in the
config's state folder (``state``, ``status``), where ``health`` and ``status`` find it.

A worker starts with SIGHUP blocked (its supervisor sets the mask before exec):
one that arrives before the handler is installed waits, and is taken once it is.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig, ServerKind
from extproc.config.sections import ConfigError
from extproc.policy.secrets import SecretError
from extproc.runtime.reload import PolicyHolder, watch
from extproc.runtime.status import ProcessorRecord, watcher_stuck
from extproc.runtime.workers import StagedCommit, Supervisor, report_version
from extproc.runtime.xds import XdsWriter
from extproc.server import grpcio_backend, lean_backend
from extproc.server.calls import SERVICE_NAME, Services
from extproc.server.lifecycle import Hooks
from extproc.server.metrics import Metrics
from extproc.spend.database import DatabaseError
from extproc.spend.service import spend_for
from extproc.usage.limiter import limiter_for

log = logging.getLogger("extproc")
GRACE_SECONDS = 5.0
WATCHDOG_SECONDS = 5.0
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
    staged = StagedCommit(worker_dir) if worker_dir is not None else None
    on_loaded = staged or (writer.write if writer else None)
    holder = PolicyHolder(config_path, metrics, on_loaded=on_loaded, socket=socket)
    if not holder.load():
        return 2
    if staged is not None:
        staged.armed = True  # from now on, a reload commits only on the supervisor's word
    config = holder.config
    assert config is not None
    settings = config.extproc
    if config.metrics is not None and worker_dir is None:
        try:
            metrics.serve(config.metrics)
        except OSError as exc:
            where = f"{config.metrics.address}:{config.metrics.port}"
            log.error("metrics port %s: cannot listen: %s", where, exc.strerror or exc)
            return 1
    run = _Run(holder, worker_dir, settings.server)
    try:
        limiter = limiter_for(config.limits, os.environ, run.store_synced)
    except SecretError as exc:
        log.error("limits store password: %s", exc)
        return 2
    try:
        spend = spend_for(config, metrics.registry)
    except (DatabaseError, SecretError) as exc:
        log.error("spend database: %s", exc)
        return 2
    sinks = (spend,) if spend is not None else ()
    services = Services(holder, metrics, limiter, sinks=sinks, budgets=spend)
    if spend is not None:
        run.on_config = lambda loaded: spend.reconfigure(loaded.spend)  # budgets reload live
    hooks = Hooks(run.on_started, run.on_reload_signal, GRACE_SECONDS)
    health = run.health
    if isinstance(health, lean_backend.Health):
        code = lean_backend.run(settings, services=services, health=health, hooks=hooks)
    else:
        code = grpcio_backend.run(settings, services=services, health=health, hooks=hooks)
    if limiter is not None:
        limiter.close()
    if spend is not None:
        spend.close()  # the last batch of records is written
    run.stopped()
    log.info("ext_proc stopped")
    return code


class _Run:
    """One processor's health, watcher and status record while it serves."""

    def __init__(self, holder: PolicyHolder, worker_dir: Path | None, kind: ServerKind) -> None:
        self.holder = holder
        self.worker_dir = worker_dir
        self.health: lean_backend.Health | grpcio_backend.GrpcioHealth = (
            lean_backend.Health() if kind is ServerKind.LEAN else grpcio_backend.GrpcioHealth()
        )
        assert holder.config is not None
        target = holder.config.extproc.target
        self.record = ProcessorRecord(holder, target) if worker_dir is None else None
        self.stop = threading.Event()
        self.on_config: Callable[[GatewayConfig], None] | None = None  # after each good load
        self.watcher = threading.Thread(
            target=watch, args=(holder, self.stop, self.reload), name="watch", daemon=True
        )

    def config_healthy(self) -> None:
        stuck = self.worker_dir is None and watcher_stuck(self.holder, self.watcher.is_alive())
        self.health.set(CONFIG_HEALTH, self.holder.last_ok and not stuck)
        if self.record is not None:
            self.record.watcher = "STUCK" if stuck else "ok"
            self.record.write()

    def reload(self) -> bool:
        ok = self.holder.load()
        self.config_healthy()
        if ok and self.on_config is not None and self.holder.config is not None:
            self.on_config(self.holder.config)
        if self.worker_dir is not None:
            report_version(self.worker_dir, self.holder.policy.version)
        return ok

    def on_reload_signal(self) -> None:
        threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def on_started(self) -> None:
        for service in ("", SERVICE_NAME, CONFIG_HEALTH):
            self.health.set(service, True)
        settings = self.holder.config
        assert settings is not None
        log.info("ext_proc (%s) on %s", settings.extproc.server.value, settings.extproc.where)
        if self.worker_dir is not None:  # the supervisor watches the files and sends SIGHUP
            report_version(self.worker_dir, self.holder.policy.version)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # handler in place
            return
        self.watcher.start()
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        if self.record is not None:
            self.record.serving = True
            self.record.write()

    def store_synced(self, ok: bool, lost: int) -> None:
        self.holder.metrics.store_synced(ok, lost)
        if self.record is not None:
            self.record.store_synced(ok)

    def stopped(self) -> None:
        self.stop.set()
        if self.record is not None:
            self.record.serving = False
            self.record.write()

    def _watchdog(self) -> None:
        """Re-check config health every few seconds: a stuck watcher cannot report itself."""
        while not self.stop.wait(WATCHDOG_SECONDS):
            self.config_healthy()
