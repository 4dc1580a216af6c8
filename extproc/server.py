"""Run the processor: load the policy, serve gRPC + health + metrics, stop gracefully.

Health is SERVING only once config and secrets are loaded; SIGTERM turns it
NOT_SERVING first (so Envoy and probes stop sending), then the server stops
with a grace period for the streams in flight.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.config import load_config
from extproc.metrics import Metrics
from extproc.model import GatewayConfig
from extproc.policy import Policy, compile_policy
from extproc.sections import ConfigError
from extproc.servicer import SERVICE_NAME, ExternalProcessor

log = logging.getLogger("extproc")
GRACE_SECONDS = 5.0


class PolicyHolder:
    """The one place the current policy lives; a load swaps it as a single reference."""

    def __init__(
        self, config_path: Path, metrics: Metrics, environ: Mapping[str, str] = os.environ
    ):
        self.config_path = config_path
        self._metrics = metrics
        self._environ = environ
        self._policy: Policy | None = None
        self.config: GatewayConfig | None = None  # the config the current policy came from
        self.last_error: str = ""

    @property
    def policy(self) -> Policy:
        policy = self._policy
        assert policy is not None, "load() before serving"
        return policy

    @property
    def loaded(self) -> bool:
        return self._policy is not None

    def load(self) -> bool:
        """Load config + secrets; on failure keep the last good policy and report why."""
        try:
            config = load_config(self.config_path)
            policy = compile_policy(config, self._environ)
        except ConfigError as exc:
            self.last_error = str(exc)
            self._metrics.loaded("", ok=False)
            kept = "keeping the last good config" if self._policy else "nothing to serve"
            log.error("config not loaded (%s):\n  %s", kept, "\n  ".join(exc.problems))
            return False
        self._policy, self.config, self.last_error = policy, config, ""
        self._metrics.loaded(policy.version, ok=True)
        for route in policy.missing_optional:
            log.warning(
                "route %s: optional secret not set; credential-less requests get 401", route
            )
        log.info("config %s loaded: %d credential route(s)", policy.version, len(policy.routes))
        return True


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


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, status)


def serve(config_path: Path, threads: int = 16) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    metrics = Metrics()
    holder = PolicyHolder(config_path, metrics)
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
    set_serving(health_servicer, True)
    log.info("ext_proc listening on %s", address)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info(
            "%s: NOT_SERVING, stopping within %.0fs", signal.Signals(signum).name, GRACE_SECONDS
        )
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(GRACE_SECONDS).wait()
    log.info("ext_proc stopped")
    return 0
