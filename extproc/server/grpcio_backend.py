"""The reference processor server on grpcio (``extproc.server: grpcio``).

Same answers as the default server (both call ``processor.process``), on the
official gRPC runtime; it costs several times more CPU per request.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from types import FrameType

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config.model import ExtprocSettings
from extproc.server import unixsocket
from extproc.server.calls import Services
from extproc.server.lifecycle import Hooks
from extproc.server.servicer import AccessLogService, ExternalProcessor

log = logging.getLogger("extproc")


class GrpcioHealth:
    """grpcio's health servicer behind the same ``set(service, serving)`` as the lean one."""

    def __init__(self) -> None:
        self.servicer = grpc_health.HealthServicer()

    def set(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        self.servicer.set(service, status.SERVING if serving else status.NOT_SERVING)


def build_server(
    services: Services, health: GrpcioHealth, threads: int, reuse_port: bool
) -> grpc.Server:
    """A gRPC server with the processor and the health service registered (not started)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="extproc"),
        options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
    )
    server.add_generic_rpc_handlers(
        [ExternalProcessor(services).handler(), AccessLogService(services).handler()]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    return server


def run(
    settings: ExtprocSettings,
    *,
    services: Services,
    health: GrpcioHealth,
    hooks: Hooks,
) -> int:
    """Serve until SIGTERM/SIGINT, then NOT_SERVING and a graceful stop; returns the exit code."""
    server = build_server(services, health, threads=16, reuse_port=settings.workers > 1)
    try:
        if settings.socket is not None:
            unixsocket.prepare(settings.socket)
        server.add_insecure_port(settings.target)
    except (RuntimeError, OSError) as exc:
        log.error("cannot listen on %s: %s", settings.where, exc)
        return 1
    server.start()
    if settings.socket is not None:
        unixsocket.restrict(settings.socket)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: NOT_SERVING, stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: hooks.on_reload())
    hooks.on_started()
    stopping.wait()
    health.servicer.enter_graceful_shutdown()
    server.stop(hooks.grace_s).wait()
    return 0
