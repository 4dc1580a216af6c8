"""The processes under test, on free loopback ports, started in order and stopped in reverse.

    wrk ─┬─> bare Envoy (baseline) ──────────────────────┬─> direct-response Envoy
         └─> gateway Envoy ──(ext_proc gRPC)──> processor ┘   (and the SSE upstream)

Every Envoy runs one worker thread (``--concurrency 1``) so the figures say
what one core of Envoy does. Process output goes to files in the run folder
and is shown only when something fails to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from extproc.config.model import Endpoint
from extproc.runtime import processes

LOOPBACK = "127.0.0.1"
SERVER_KEY_ENV = "BENCH_ANTHROPIC_API_KEY"
SERVER_KEY = "sk-ant-api03-bench-server-key-0000000000000000000000000000"  # a dummy
API_PREFIX = "/anthropic/"
SSE_PREFIX = "/sse/"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"
_THRESHOLDS = {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
_START_DEADLINE_S = 30.0
MESSAGE_BODY = json.dumps(
    {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "claude-bench-1",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 12, "output_tokens": 1},
    },
    separators=(",", ":"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def _listener(port: int, name: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    manager = {
        "@type": "type.googleapis.com/" + _HCM,
        "stat_prefix": name,
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _typed(_ROUTER)}}
        ],
    }
    return {
        "name": name,
        "address": _address(port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def _typed(name: str) -> str:
    return "type.googleapis.com/" + name


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "circuit_breakers": {"thresholds": [_THRESHOLDS]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }


def upstream_bootstrap(port: int, admin: int) -> dict[str, Any]:
    """An Envoy that answers every request itself: a 200 with a short Messages response.

    The body is shaped like Anthropic's (``usage`` included), so a metering
    gateway parses what it would parse in production.
    """
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": MESSAGE_BODY}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}}
        ],
    }
    return {
        "admin": {"address": _address(admin)},
        "static_resources": {"listeners": [_listener(port, "upstream", [route])]},
    }


def baseline_bootstrap(port: int, admin: int, upstream: int, sse: int) -> dict[str, Any]:
    """A bare Envoy proxy with the gateway's prefixes and rewrites, and nothing else."""
    routes = [
        {
            "match": {"prefix": prefix},
            "route": {"cluster": cluster, "prefix_rewrite": "/", "timeout": "0s"},
        }
        for prefix, cluster in ((API_PREFIX, "upstream"), (SSE_PREFIX, "sse"))
    ]
    return {
        "admin": {"address": _address(admin)},
        "static_resources": {
            "listeners": [_listener(port, "baseline", routes)],
            "clusters": [_cluster("upstream", upstream), _cluster("sse", sse)],
        },
    }


def gateway_config(
    *,
    listener: int,
    admin: int,
    extproc: int,
    metrics: int,
    upstream: int,
    sse: int,
    workers: int,
    server: str | None = None,
    keys_file: Path | None = None,
    routes: int = 2,
    metering: bool = False,
) -> dict[str, Any]:
    """The ops YAML for the gateway: two credential routes, one per upstream.

    ``server`` (the config's ``extproc.server``) is written only when given, so the
    benchmark also runs against versions that do not know the key. ``keys_file``
    turns on gateway keys for every route; ``routes`` above 2 adds routes
    ``/r0002/`` … to the API upstream, all with the same credential; ``metering``
    adds ``metering: true`` (Envoy's second, observing ext_proc filter).
    """
    extproc_block: dict[str, Any] = {"address": LOOPBACK, "port": extproc, "workers": workers}
    if server is not None:
        extproc_block["server"] = server
    credential = {
        "header": "x-api-key",
        "format": "{secret}",
        "secret": {"env": SERVER_KEY_ENV},
        "client_credentials": ["authorization", "x-api-key"],
    }
    api, events = f"http://{LOOPBACK}:{upstream}", f"http://{LOOPBACK}:{sse}"
    config: dict[str, Any] = {
        "listener": {"address": LOOPBACK, "port": listener},
        "admin": {"address": LOOPBACK, "port": admin},
        "extproc": extproc_block,
        "metrics": {"address": LOOPBACK, "port": metrics},
    }
    if keys_file is not None:
        config["access"] = {"keys_file": str(keys_file)}
    if metering:
        config["metering"] = True
    config["routes"] = [
        {"name": "anthropic", "prefix": API_PREFIX, "upstream": api, "credential": credential},
        {"name": "sse", "prefix": SSE_PREFIX, "upstream": events, "credential": credential},
        *(numbered_route(number, api, credential) for number in range(2, routes)),
    ]
    return config


def numbered_route(number: int, upstream: str, credential: dict[str, Any]) -> dict[str, Any]:
    """Route ``r<number>`` (prefix ``/r<number>/``) for configs with many routes."""
    name = f"r{number:04d}"
    return {"name": name, "prefix": f"/{name}/", "upstream": upstream, "credential": credential}


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int  # where clients (or Envoy) send requests
    admin: Endpoint | None = None  # Envoy's admin endpoint

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str = "/") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges from the admin API."""
        assert self.admin is not None, f"{self.name} has no admin endpoint"
        url = f"http://{self.admin.address}:{self.admin.port}/stats"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                values[name] = int(value)
        return values


@dataclass
class Topology:
    upstream: Service
    sse: Service
    baseline: Service
    processor: Service
    gateway: Service
    config: Path

    def services(self) -> list[Service]:
        return [self.upstream, self.sse, self.baseline, self.processor, self.gateway]


@dataclass
class Stack:
    """Starts services into ``folder`` and stops them in reverse order on exit."""

    folder: Path
    envoy: str = field(default_factory=processes.find_envoy)
    services: list[Service] = field(default_factory=list)

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for service in reversed(self.services):
            processes.stop(service.process)
        if error is not None and not isinstance(error, KeyboardInterrupt):
            self.show_logs()

    def show_logs(self) -> None:
        for service in self.services:
            text = service.log.read_text(errors="replace")[-4000:]
            print(f"--- {service.name} ({service.log}) ---\n{text}", file=sys.stderr)

    def _spawn(
        self, name: str, command: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.folder / f"{name}.log"
        env = {**(env or os.environ), "PYTHONPATH": _python_path()}
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=self.folder
            )
        return process, log

    def envoy_service(self, name: str, bootstrap: dict[str, Any] | Path, port: int) -> Service:
        """Start Envoy with one worker and wait until its admin API says it is ready."""
        if isinstance(bootstrap, Path):
            path = bootstrap
            admin_block = yaml.safe_load(path.read_text())["admin"]["address"]["socket_address"]
        else:
            path = self.folder / f"{name}.yaml"
            path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
            admin_block = bootstrap["admin"]["address"]["socket_address"]
        admin = Endpoint(admin_block["address"], admin_block["port_value"])
        command = [*processes.envoy_command(self.envoy, path), "--concurrency", "1"]
        process, log = self._spawn(name, command)
        service = Service(name, process, log, port, admin)
        self.services.append(service)
        processes.wait_envoy_ready(admin, _START_DEADLINE_S, process)
        return service

    def processor_service(
        self,
        config: Path,
        port: int,
        command: str | None,
        name: str = "processor",
        xds_dir: Path | None = None,
    ) -> Service:
        """Start the processor (ours, or ``command`` with ``{config}``) and wait for SERVING.

        With ``xds_dir`` ours rewrites the xDS files there on every config change.
        """
        argv = (
            shlex.split(command.format(config=config))
            if command
            else [sys.executable, "-m", "extproc", "serve", str(config)]
        )
        if xds_dir is not None:
            argv += ["--xds-dir", str(xds_dir)]
        env = {**os.environ, SERVER_KEY_ENV: SERVER_KEY}
        process, log = self._spawn(name, argv, env)
        service = Service(name, process, log, port)
        self.services.append(service)
        processes.wait_serving(f"{LOOPBACK}:{port}", _START_DEADLINE_S, process)
        return service

    def python_service(self, name: str, script: Path, port: int) -> Service:
        process, log = self._spawn(name, [sys.executable, str(script), "--port", str(port)])
        service = Service(name, process, log, port)
        self.services.append(service)
        _wait_listening(port, process, name)
        return service


def _python_path() -> str:
    """The repository root first, so ``python -m extproc`` works without a pip install."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def _wait_listening(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    end = time.monotonic() + _START_DEADLINE_S
    while True:
        if process.poll() is not None:
            raise processes.NotReady(f"{name} exited with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        if time.monotonic() > end:
            raise processes.NotReady(f"{name} not listening on {port} after {_START_DEADLINE_S}s")
        time.sleep(0.05)


@dataclass(frozen=True)
class Upstreams:
    upstream: Service  # the direct-response Envoy
    sse: Service
    baseline: Service  # the bare Envoy proxy in front of both


@dataclass(frozen=True)
class Gateway:
    processor: Service
    envoy: Service
    config: Path
    xds_dir: Path | None  # dynamic mode: the files the processor rewrites on a change

    def topology(self, upstreams: Upstreams) -> Topology:
        """This gateway with the shared upstreams, as ``measure`` takes it."""
        return Topology(
            upstreams.upstream, upstreams.sse, upstreams.baseline,
            self.processor, self.envoy, self.config,
        )  # fmt: skip


def render(config: Path, output: Path, xds_dir: Path | None = None) -> None:
    """``python -m extproc render CONFIG -o OUTPUT [--xds-dir DIR]`` as an operator runs it."""
    extra = ["--xds-dir", str(xds_dir)] if xds_dir else []
    subprocess.run(
        [sys.executable, "-m", "extproc", "render", str(config), "-o", str(output), *extra],
        check=True,
        env={**os.environ, "PYTHONPATH": _python_path()},
    )


def start_upstreams(stack: Stack) -> Upstreams:
    """The direct-response Envoy, the SSE upstream, then the bare Envoy proxy."""
    ports = {name: free_port() for name in ("up", "up_admin", "sse", "base", "base_admin")}
    upstream = stack.envoy_service(
        "upstream", upstream_bootstrap(ports["up"], ports["up_admin"]), ports["up"]
    )
    sse_script = Path(__file__).with_name("sse_upstream.py")
    sse = stack.python_service("sse-upstream", sse_script, ports["sse"])
    baseline = stack.envoy_service(
        "baseline",
        baseline_bootstrap(ports["base"], ports["base_admin"], ports["up"], ports["sse"]),
        ports["base"],
    )
    return Upstreams(upstream, sse, baseline)


def start_gateway(
    stack: Stack,
    upstreams: Upstreams,
    *,
    name: str = "gateway",
    workers: int = 1,
    processor_command: str | None = None,
    server: str | None = None,
    keys_file: Path | None = None,
    routes: int = 2,
    xds: bool = False,
    metering: bool = False,
) -> Gateway:
    """Processor, then Envoy with the rendered bootstrap (``xds``: dynamic resources).

    Names other than ``gateway`` prefix the config, logs and xDS folder, so
    several gateways can run side by side in one stack.
    """
    prefix = "" if name == "gateway" else f"{name}-"
    listener, extproc = free_port(), free_port()
    config = stack.folder / f"{prefix}gateway.yaml"
    settings = gateway_config(
        listener=listener,
        admin=free_port(),
        extproc=extproc,
        metrics=free_port(),
        upstream=upstreams.upstream.port,
        sse=upstreams.sse.port,
        workers=workers,
        server=server,
        keys_file=keys_file,
        routes=routes,
        metering=metering,
    )
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    xds_dir = stack.folder / f"{prefix}xds" if xds else None
    processor = stack.processor_service(
        config, extproc, processor_command, f"{prefix}processor", xds_dir
    )
    bootstrap = stack.folder / f"{prefix}gateway-envoy.yaml"
    render(config, bootstrap, xds_dir)
    envoy = stack.envoy_service(name, bootstrap, listener)
    return Gateway(processor, envoy, config, xds_dir)


def start(
    stack: Stack,
    workers: int,
    processor_command: str | None,
    server: str | None = None,
    metering: bool = False,
) -> Topology:
    """Upstreams first, then the baseline, then processor → gateway Envoy."""
    upstreams = start_upstreams(stack)
    gateway = start_gateway(
        stack,
        upstreams,
        workers=workers,
        processor_command=processor_command,
        server=server,
        metering=metering,
    )
    return gateway.topology(upstreams)
