"""The default processor server: ext_proc, Envoy's access-log service (usage records) and
gRPC health on ``h2server``, in one asyncio loop.

Every call is answered inside the callback that received its message, so the
loop never waits on anything but the network; uvloop is used when installed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from extproc.config.model import ExtprocSettings
from extproc.policy.processor import MalformedRequest
from extproc.server import unixsocket
from extproc.server.calls import ACCESS_LOG_SERVICE, SERVICE_NAME, Services, decide
from extproc.server.h2server import Call, GrpcServer, Limits, Method, Opener, Reply
from extproc.server.lifecycle import Hooks

log = logging.getLogger("extproc")
PROCESS_PATH = f"/{SERVICE_NAME}/Process".encode()
ACCESS_LOG_PATH = f"/{ACCESS_LOG_SERVICE}/StreamAccessLogs".encode()
HEALTH_CHECK_PATH = b"/grpc.health.v1.Health/Check"
INVALID_ARGUMENT, NOT_FOUND = 3, 5
_LOGS_RECEIVED = als_pb2.StreamAccessLogsResponse().SerializeToString()


class Health:
    """gRPC health statuses by service name, answered by the Check method."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}

    def set(self, service: str, serving: bool) -> None:
        self._status[service] = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def check(self, message: bytes) -> Reply:
        try:
            service = health_pb2.HealthCheckRequest.FromString(message).service
        except DecodeError:
            return None, INVALID_ARGUMENT, "malformed HealthCheckRequest"
        status = self._status.get(service)
        if status is None:
            return None, NOT_FOUND, f"unknown service {service!r}"
        return health_pb2.HealthCheckResponse(status=status).SerializeToString(), 0, ""


def process_method(services: Services) -> Method:
    """ExternalProcessor/Process: answer each message; end the call after the request headers."""
    parse = ext_proc.ProcessingRequest.FromString

    def on_message(message: bytes) -> Reply:
        try:
            answer = decide(services, parse(message))
        except (DecodeError, MalformedRequest) as exc:
            return None, INVALID_ARGUMENT, str(exc)
        # Any other exception (a bug) fails this call only: the server's one place for it.
        return answer.payload, (0 if answer.final else None), ""

    return on_message


def access_log_opener(services: Services) -> Opener:
    """AccessLogService/StreamAccessLogs (client-streaming): each message is a batch of usage
    records, read at once; the one (empty) answer when Envoy ends its side."""
    meter = services.meter()

    def on_message(message: bytes) -> Reply:
        meter.batch(services.source.policy, message)
        return None, None, ""

    call = Call(on_message, on_client_end=lambda: (_LOGS_RECEIVED, None, ""))
    return lambda: call


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(
    settings: ExtprocSettings,
    *,
    services: Services,
    health: Health,
    hooks: Hooks,
) -> int:
    """Serve until SIGTERM/SIGINT, then NOT_SERVING and a graceful stop; returns the exit code."""
    loop = _event_loop()
    limits = Limits(
        max_connections=settings.max_connections,
        idle_timeout_s=settings.idle_timeout_s,
        memory_budget=settings.memory_budget_mb << 20,
    )
    server = GrpcServer(
        {HEALTH_CHECK_PATH: health.check, PROCESS_PATH: process_method(services)},
        limits,
        openers={ACCESS_LOG_PATH: access_log_opener(services)},
    )
    try:
        if settings.socket is not None:
            unixsocket.prepare(settings.socket)
            loop.run_until_complete(server.start_unix(settings.socket))
            unixsocket.restrict(settings.socket)
        else:
            loop.run_until_complete(
                server.start(settings.address, settings.port, settings.workers > 1)
            )
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.where, exc.strerror or exc)
        return 1
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _stopper(signum, stop))
    loop.add_signal_handler(signal.SIGHUP, hooks.on_reload)
    hooks.on_started()
    loop.run_until_complete(stop.wait())
    health.set("", False)
    health.set(SERVICE_NAME, False)
    loop.run_until_complete(server.stop(hooks.grace_s))
    loop.close()
    if settings.socket is not None:
        unixsocket.remove(settings.socket)
    return 0


def _stopper(signum: int, stop: asyncio.Event) -> Callable[[], None]:
    def on_signal() -> None:
        log.info("%s: NOT_SERVING, stopping", signal.Signals(signum).name)
        stop.set()

    return on_signal
