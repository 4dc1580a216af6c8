"""Run the gateway under test: ``python -m extproc serve`` and Envoy as real processes.

A ``Gateway`` owns one working folder: the YAML it writes (with free ports),
the Envoy bootstrap rendered from it by ``python -m extproc render``, and one
log file per process. The processor's environment is built from nothing but
the secrets a test passes, so a test controls exactly which keys exist.

Start order is the one ``up`` uses: processor, wait for gRPC SERVING, then
Envoy, wait for its admin ``/ready``. Stop order is the reverse. The
processes stay reachable (``extproc_process``, ``envoy_process``) so a test can
kill or restart one of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from extproc.config.model import Endpoint
from extproc.runtime import processes
from harness.ports import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose extproc/ is under test
READY_DEADLINE_S = 30.0
_START_ATTEMPTS = 3  # a port picked by free_port() can be taken before the process binds it
_BIND_FAILURES = ("already in use", "cannot listen", "cannot bind")
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
_REPORT_LINES = 200
# The product default (200 ms) is a latency budget; on a busy 2-core test machine the
# processor misses it now and then and Envoy answers 504. Tests of the decision must not
# depend on machine load, so they allow more; a test of the timeout itself overrides it.
EXTPROC_TIMEOUT_MS = 5000

Route = dict[str, Any]
_NOTHING: Mapping[str, Any] = MappingProxyType({})

# Decision tests run once per path: fast path (Envoy routes client credentials past the
# processor) and processor only (every request on a credential route asks the processor).
FAST_PATH_MODES = (True, False)
FAST_PATH_IDS = ("fast_path", "processor_only")


class GatewayStartError(processes.NotReady):
    """The gateway did not come up; the message carries its config and logs."""


def base_env(extra: Mapping[str, str] = _NOTHING) -> dict[str, str]:
    """A minimal environment: enough to run Python from this checkout, plus ``extra``.

    Nothing else is inherited, so a key set in the developer's shell (say
    ANTHROPIC_API_KEY) can never leak into a test that expects it unset.
    """
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def credential_route(
    name: str,
    upstream: str,
    secret: Mapping[str, Any] | None = None,
    *,
    prefix: str | None = None,
    header: str = "x-api-key",
    format: str | None = None,  # the YAML field's name
    client_credentials: Sequence[str] | None = None,
    **extra: Any,
) -> Route:
    """A route dict with a ``credential`` block; the secret defaults to env ``<NAME>_KEY``."""
    credential: dict[str, Any] = {
        "header": header,
        "secret": dict(secret) if secret else {"env": env_name(name)},
    }
    if format is not None:
        credential["format"] = format
    if client_credentials is not None:
        credential["client_credentials"] = list(client_credentials)
    return {
        "name": name,
        "prefix": prefix or f"/{name}/",
        "upstream": upstream,
        "credential": credential,
        **extra,
    }


def env_name(route_name: str) -> str:
    """The env var ``credential_route`` reads a route's secret from: ``anthropic`` → ANTHROPIC_KEY."""
    return route_name.upper().replace("-", "_") + "_KEY"


class Gateway:
    """One gateway (processor + Envoy) in ``workdir``; ``start()`` then ``stop()``."""

    def __init__(
        self,
        workdir: Path,
        routes: Sequence[Route],
        *,
        env: Mapping[str, str] = _NOTHING,  # secrets etc. for the processor
        listener: Mapping[str, Any] = _NOTHING,  # merged into listener:
        extproc: Mapping[str, Any] = _NOTHING,  # merged into extproc:
        top: Mapping[str, Any] = _NOTHING,  # other top-level keys
        dynamic: bool = True,  # listeners/routes/clusters in watched files, as `up` runs them
        envoy_log_level: str = "warning",
    ) -> None:
        self.name = workdir.name
        self.workdir = workdir
        self.routes = [dict(route) for route in routes]
        self.env = base_env(env)
        self.listener_overrides = dict(listener)
        self.extproc_overrides = dict(extproc)
        self.top_overrides = dict(top)
        self.envoy_log_level = envoy_log_level
        self.xds_dir = workdir / "xds" if dynamic else None
        self.config_path = workdir / "gateway.yaml"
        self.bootstrap_path = workdir / "envoy.yaml"
        self.extproc_log = workdir / "extproc.log"
        self.envoy_log = workdir / "envoy.log"
        self.extproc_process: subprocess.Popen[bytes] | None = None
        self.envoy_process: subprocess.Popen[bytes] | None = None
        self.listener_port = self.admin_port = self.extproc_port = 0
        self._envoy_log_start = 0  # where this Envoy's output starts in the (appended) log
        workdir.mkdir(parents=True, exist_ok=True)

    # -- configuration ---------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The ops YAML as a dict, with this gateway's ports."""
        return {
            "listener": {
                "address": "127.0.0.1",
                "port": self.listener_port,
                **self.listener_overrides,
            },
            "admin": {"address": "127.0.0.1", "port": self.admin_port},
            "extproc": {
                "address": "127.0.0.1",
                "port": self.extproc_port,
                "timeout_ms": EXTPROC_TIMEOUT_MS,
                **self.extproc_overrides,
            },
            "routes": self.routes,
            **self.top_overrides,
        }

    def write_config(self) -> Path:
        """Pick fresh ports and write the YAML; returns its path."""
        ports: list[int] = []
        while len(ports) < 3:
            if (port := free_port()) not in ports:
                ports.append(port)
        self.listener_port, self.admin_port, self.extproc_port = ports
        self._write_yaml()
        return self.config_path

    def reconfigure(
        self,
        routes: Sequence[Route] | None = None,
        *,
        listener: Mapping[str, Any] | None = None,
        extproc: Mapping[str, Any] | None = None,
        top: Mapping[str, Any] | None = None,
    ) -> None:
        """Rewrite the YAML in place (same ports), as an operator would for a live reload."""
        if routes is not None:
            self.routes = [dict(route) for route in routes]
        if listener is not None:
            self.listener_overrides = dict(listener)
        if extproc is not None:
            self.extproc_overrides = dict(extproc)
        if top is not None:
            self.top_overrides = dict(top)
        self._write_yaml()

    def _write_yaml(self) -> None:
        # Write then rename, so the processor's watcher never reads half a file.
        partial = self.config_path.with_suffix(".partial")
        partial.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        partial.replace(self.config_path)

    @property
    def tls(self) -> bool:
        return "tls" in self.listener_overrides

    @property
    def base_url(self) -> str:
        """Where clients connect (``https`` when the listener has TLS)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.listener_port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def admin(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.admin_port)

    @property
    def extproc_address(self) -> str:
        return f"127.0.0.1:{self.extproc_port}"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Gateway:
        """Write config, start both processes and wait until both are ready."""
        attempt = 1
        while True:
            self.write_config()
            try:
                self.start_extproc()
                self.render()
                self.start_envoy()
                return self
            except processes.NotReady as exc:
                self.stop()
                if attempt == _START_ATTEMPTS or not self._lost_a_port():
                    raise GatewayStartError(f"{exc}\n{self.report()}") from exc
            except BaseException:
                self.stop()
                raise
            attempt += 1

    def _xds_option(self) -> list[str]:
        return [] if self.xds_dir is None else ["--xds-dir", str(self.xds_dir)]

    def render(self) -> None:
        """The bootstrap, from the CLI, in an environment without any secret."""
        command = [sys.executable, "-m", "extproc", "render", str(self.config_path),
                   "-o", str(self.bootstrap_path), *self._xds_option()]  # fmt: skip
        done = subprocess.run(
            command,
            env=base_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise GatewayStartError(f"render failed ({done.returncode}):\n{done.stderr}")

    def start_extproc(self) -> subprocess.Popen[bytes]:
        """Start the processor and wait for SERVING (also used to restart it)."""
        command = [sys.executable, "-m", "extproc", "serve", str(self.config_path),
                   *self._xds_option()]  # fmt: skip
        self.extproc_process = _spawn(command, self.extproc_log, self.env)
        processes.wait_serving(self.extproc_address, READY_DEADLINE_S, self.extproc_process)
        return self.extproc_process

    def start_envoy(self) -> subprocess.Popen[bytes]:
        envoy = processes.find_envoy()
        command = processes.envoy_command(envoy, self.bootstrap_path, self.envoy_log_level)
        self._envoy_log_start = self.envoy_log.stat().st_size if self.envoy_log.exists() else 0
        self.envoy_process = _spawn(command, self.envoy_log, base_env())
        processes.wait_envoy_ready(self.admin, READY_DEADLINE_S, self.envoy_process)
        self._wait_listener()
        return self.envoy_process

    def _wait_listener(self) -> None:
        """Wait until Envoy listens on our port.

        ``/ready`` is not enough in dynamic mode: a listener from the LDS file that
        cannot bind is rejected with a log line while Envoy stays up and "ready".
        """
        end = time.monotonic() + READY_DEADLINE_S
        while self.listener_port not in self._bound_ports():
            this_run = self.envoy_log.read_bytes()[self._envoy_log_start :].decode(errors="replace")
            this_run = this_run.lower()
            if any(marker in this_run for marker in _BIND_FAILURES):
                raise processes.NotReady(f"envoy cannot bind port {self.listener_port}")
            if time.monotonic() > end:
                raise processes.NotReady(f"envoy not listening on {self.listener_port}")
            time.sleep(0.05)

    def _bound_ports(self) -> set[int]:
        url = f"http://127.0.0.1:{self.admin_port}/listeners?format=json"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                statuses = json.load(reply).get("listener_statuses", [])
        except (OSError, ValueError):
            return set()
        return {
            status["local_address"]["socket_address"]["port_value"]
            for status in statuses
            if "socket_address" in status.get("local_address", {})
        }

    def stop_extproc(self) -> int | None:
        if self.extproc_process is None:
            return None
        code = processes.stop(self.extproc_process)
        self.extproc_process = None
        return code

    def stop_envoy(self) -> int | None:
        if self.envoy_process is None:
            return None
        code = processes.stop(self.envoy_process)
        self.envoy_process = None
        return code

    def stop(self) -> None:
        """Envoy first (it stops taking requests), then the processor."""
        try:
            self.stop_envoy()
        finally:
            self.stop_extproc()

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- logs ------------------------------------------------------------------------------

    def logs(self) -> str:
        """Both processes' output so far (the processor's first)."""
        return _read(self.extproc_log) + _read(self.envoy_log)

    def access_log(self) -> list[dict[str, Any]]:
        """Envoy's JSON access log entries so far."""
        entries = []
        for line in _read(self.envoy_log).splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line still being written
        return entries

    def wait_access_log(
        self, matches: Callable[[dict[str, Any]], bool], deadline_s: float = 10.0
    ) -> dict[str, Any]:
        """The first access log entry ``matches`` accepts; Envoy flushes its log on a timer."""
        end = time.monotonic() + deadline_s
        while True:
            found = [entry for entry in self.access_log() if matches(entry)]
            if found:
                return found[0]
            if time.monotonic() > end:
                raise AssertionError(f"no matching access log entry after {deadline_s:.0f}s")
            time.sleep(0.05)

    def report(self) -> str:
        """Config and log tails for a failed test (the YAML holds no secret values)."""
        parts = [f"--- {self.config_path}", _read(self.config_path)]
        for path in (self.extproc_log, self.envoy_log):
            lines = _read(path).splitlines()[-_REPORT_LINES:]
            parts += [f"--- {path} (last {_REPORT_LINES} lines)", "\n".join(lines)]
        return "\n".join(parts)

    def _lost_a_port(self) -> bool:
        text = self.logs().lower()
        return any(marker in text for marker in _BIND_FAILURES)


def run_serve(
    config: Path, env: Mapping[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m extproc serve`` expecting it to exit by itself (a startup error)."""
    return subprocess.run(
        [sys.executable, "-m", "extproc", "serve", str(config)],
        env=base_env(env), cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
        check=False,
    )  # fmt: skip


def _spawn(command: list[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own descriptor; append across restarts
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env), cwd=ROOT,
        )  # fmt: skip


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
