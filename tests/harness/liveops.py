"""Helpers for the live-operations tests: traffic that keeps flowing while things change.

- ``LiveGateway``: a ``Gateway`` with a metrics port, whose YAML can also be mounted the
  way Kubernetes mounts a ConfigMap (``config_mount=True``).
- ``Traffic``: client threads that send requests until stopped and record every outcome,
  each request numbered (``?n=``) so the upstream's record of it can be found.
- ``KubeMount``: a folder updated exactly as the kubelet updates a ConfigMap or Secret
  volume (a ``..data`` symlink swapped in one rename).
- ``health``: the processor's gRPC health status for one service name.
- ``UpProcess``: ``python -m extproc up`` as a real subprocess, with free ports.
- ``find_leaks`` / ``files_under``: where any of a set of values appears in what was written.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.config.model import Endpoint
from extproc.runtime import processes
from harness.clients import http1, http2
from harness.gateway import ROOT, Gateway, Route, base_env, credential_route
from harness.ports import free_port
from harness.upstream import RecordedRequest, RecordingUpstream

T = TypeVar("T")
DEADLINE_S = 15.0  # how long a test waits for something that normally takes well under a second
_BIND_FAILURES = ("already in use", "cannot listen", "cannot bind")


# -- a gateway with metrics, and optionally a ConfigMap-style YAML ------------------------------


class KubeMount:
    """A folder kept the way the kubelet keeps a ConfigMap or Secret volume.

    Each visible file ``NAME`` is a symlink to ``..data/NAME``; ``..data`` is a
    symlink to a timestamped folder holding the real files. An update writes a
    new timestamped folder, points a fresh ``..data_tmp`` symlink at it and
    renames that over ``..data`` (every file changes in that one step), then
    removes the old folder. A watcher that only follows the visible file's
    inode never sees the change; one that reads through the links does.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._generation = itertools.count(1)
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / name

    def write(self, files: Mapping[str, bytes]) -> None:
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{next(self._generation):09d}"
        fresh = self.folder / stamp
        fresh.mkdir()
        for name, data in files.items():
            (fresh / name).write_bytes(data)
        data_link = self.folder / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        staging = self.folder / "..data_tmp"
        staging.symlink_to(stamp)
        os.replace(staging, data_link)  # rename(2) over the old link: the one atomic step
        for name in files:
            visible = self.folder / name
            if not visible.is_symlink():
                visible.symlink_to(Path("..data") / name)
        if old is not None:
            shutil.rmtree(self.folder / old)


class LiveGateway(Gateway):
    """A ``Gateway`` with a Prometheus port; its YAML optionally in a ``KubeMount``.

    Relies on ``Gateway`` writing its YAML only through ``_write_yaml`` (at start
    and on ``reconfigure``), which is where the ConfigMap-style update goes in.
    """

    def __init__(
        self, workdir: Path, routes: Sequence[Route], *, config_mount: bool = False, **options: Any
    ) -> None:
        super().__init__(workdir, routes, **options)
        self.metrics_port = 0
        self.mount = KubeMount(workdir / "config") if config_mount else None
        if self.mount is not None:
            self.config_path = self.mount.path("gateway.yaml")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "metrics": {"address": "127.0.0.1", "port": self.metrics_port}}

    def write_config(self) -> Path:
        self.metrics_port = free_port()
        path = super().write_config()
        while self.metrics_port in (self.listener_port, self.admin_port, self.extproc_port):
            self.metrics_port = free_port()
            self._write_yaml()
        return path

    def _write_yaml(self) -> None:
        if self.mount is None:
            super()._write_yaml()
        else:
            text = yaml.safe_dump(self.config(), sort_keys=False)
            self.mount.write({"gateway.yaml": text.encode()})

    def write_raw_yaml(self, text: str) -> None:
        """Replace the YAML with ``text`` (say, a broken one) in one rename."""
        if self.mount is not None:
            self.mount.write({"gateway.yaml": text.encode()})
            return
        partial = self.config_path.with_suffix(".partial")
        partial.write_text(text)
        partial.replace(self.config_path)

    def metrics_text(self) -> str:
        with httpx.Client(timeout=5) as client:
            reply = client.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        reply.raise_for_status()
        return reply.text

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of sample ``name`` with ``labels`` on the metrics page; None if absent."""
        return metric(self.metrics_text(), name, **labels)

    def wait_metric(
        self, name: str, accept: Callable[[float | None], bool], **labels: str
    ) -> float | None:
        """Poll the metrics page until ``accept(value)``; fails with the last value seen."""
        return poll(lambda: self.metric(name, **labels), accept, f"metric {name} {labels}")

    def health(self, service: str = "") -> int:
        return health(self.extproc_address, service)

    def wait_health(self, service: str, status: int) -> None:
        """Poll gRPC health of ``service`` until it reports ``status``.

        The processor updates metrics and health one after the other, not in one
        step, so a test that saw one change waits for the other.
        """
        poll(lambda: self.health(service), lambda now: now == status, f"health of {service!r}")


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``, from Prometheus text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def health(address: str, service: str = "") -> int:
    """The gRPC health status (a ``HealthCheckResponse`` enum value) of ``service``."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CONFIG_HEALTH = "credential-gateway.config"  # the config's health service, documented in the README


def poll(
    read: Callable[[], T], accept: Callable[[T], bool], what: str, deadline_s: float = DEADLINE_S
) -> T:
    """Call ``read`` until ``accept`` takes its value; raise AssertionError at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = read()
        if accept(value):
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: still {value!r} after {deadline_s:.0f}s")
        time.sleep(0.05)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` in one rename, as careful operators and tools do."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


# -- traffic ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    """One client thread: what it sends, over which protocol."""

    kind: str  # a label for the results, e.g. "no-credential"
    path: str  # e.g. "/anthropic/v1/messages"
    headers: Mapping[str, str] = field(default_factory=dict)
    http2: bool = False


@dataclass(frozen=True)
class Sent:
    """One request the traffic sent, and what came back."""

    kind: str
    number: int  # also in the request's query (``n=``), to find it at the upstream
    started: float  # time.monotonic()
    ended: float
    status: int | None  # None: no HTTP response at all (``error`` says why)
    body: bytes = b""
    content_type: str = ""
    error: str = ""


def steady_senders(path: str) -> list[Sender]:
    """Four credential-less client threads on ``path``: two over HTTP/1.1, two over HTTP/2."""
    return [
        Sender("http1", path),
        Sender("http1", path),
        Sender("http2", path, http2=True),
        Sender("http2", path, http2=True),
    ]


class Traffic:
    """Client threads sending requests back to back until ``stop()``.

    A short pause between requests keeps four of these (``pytest -n 2``, twice
    at once) from starving the gateway of CPU; it paces the load and
    synchronises nothing.
    """

    PAUSE_S = 0.005

    def __init__(self, base_url: str, senders: Sequence[Sender]) -> None:
        self.base_url = base_url
        self.senders = list(senders)
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._sent: list[Sent] = []
        self._crashes: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Traffic:
        for sender in self.senders:
            thread = threading.Thread(target=self._run, args=(sender,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self, sender: Sender) -> None:
        factory = http2 if sender.http2 else http1
        try:
            with factory(self.base_url) as client:
                while not self._stop.is_set():
                    self._record(self._send(client, sender))
                    self._stop.wait(self.PAUSE_S)
        except Exception as exc:  # a bug in the test itself: make it visible, never hang
            with self._lock:
                self._crashes.append(f"{sender.kind}: {exc!r}")

    def _send(self, client: httpx.Client, sender: Sender) -> Sent:
        with self._lock:
            number = next(self._numbers)
        glue = "&" if "?" in sender.path else "?"
        started = time.monotonic()
        try:
            reply = client.get(f"{sender.path}{glue}n={number}", headers=dict(sender.headers))
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            return Sent(sender.kind, number, started, time.monotonic(), None, error=error)
        content_type = reply.headers.get("content-type", "")
        return Sent(
            sender.kind, number, started, time.monotonic(), reply.status_code, reply.content,
            content_type,
        )  # fmt: skip

    def _record(self, sent: Sent) -> None:
        with self._lock:
            self._sent.append(sent)

    def sent(self, kind: str | None = None, after: float = 0.0) -> list[Sent]:
        """Completed requests (of ``kind``, started after ``after``), in completion order."""
        with self._lock:
            crashes, sent = list(self._crashes), list(self._sent)
        assert not crashes, f"traffic threads crashed: {crashes}"
        return [s for s in sent if (kind is None or s.kind == kind) and s.started > after]

    def wait(
        self, accept: Callable[[list[Sent]], bool], what: str, deadline_s: float = DEADLINE_S
    ) -> list[Sent]:
        """Poll the results until ``accept`` takes them."""
        try:
            return poll(self.sent, accept, what, deadline_s)
        except AssertionError:
            raise AssertionError(f"{what}: not after {deadline_s:.0f}s; {self.summary()}") from None

    def wait_count(
        self,
        count: int,
        kind: str | None = None,
        status: int | None = 200,
        after: float = 0.0,
        deadline_s: float = DEADLINE_S,
    ) -> list[Sent]:
        """Wait until ``count`` requests of ``kind`` started after ``after`` got ``status``."""

        def enough(sent: list[Sent]) -> bool:
            return sum(1 for s in sent if _matches(s, kind, status, after)) >= count

        what = f"{count} x {kind or 'any'} -> {status} (started after {after:.3f})"
        return self.wait(enough, what, deadline_s)

    def summary(self) -> str:
        """Counts by kind and status (or error), for failure messages."""
        counts: dict[tuple[str, str], int] = {}
        for s in self.sent():
            key = (s.kind, str(s.status) if s.status is not None else s.error[:80])
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{kind} {result}: {n}" for (kind, result), n in sorted(counts.items()))


def _matches(sent: Sent, kind: str | None, status: int | None, after: float) -> bool:
    return (kind is None or sent.kind == kind) and sent.status == status and sent.started > after


def number_of(request: RecordedRequest) -> int | None:
    """The traffic number (``n=``) a request the upstream received carries."""
    values = parse_qs(urlsplit(request.target).query).get("n")
    return int(values[-1]) if values else None


def by_number(upstream: RecordingUpstream) -> dict[int, RecordedRequest]:
    """The upstream's requests that came from ``Traffic``, by their number."""
    return {n: r for r in upstream.requests if (n := number_of(r)) is not None}


# -- `up` as a subprocess -----------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid`` from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parens
    return fields[0], int(fields[1]), int(fields[19])


@dataclass(frozen=True)
class Child:
    """A process started by another one, identified by pid and start time (pids get reused)."""

    pid: int
    start_time: int
    command: str

    def alive(self) -> bool:
        stat = _proc_stat(self.pid)
        return stat is not None and stat[2] == self.start_time and stat[0] != "Z"


def children(pid: int) -> list[Child]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is None or stat[1] != pid:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(Child(int(entry.name), stat[2], command))
    return found


class UpProcess:
    """``python -m extproc up CONFIG`` in ``workdir``, its output in ``up.log``.

    ``start()`` picks free ports, writes the YAML and waits until Envoy's
    listener accepts connections; a port taken in between is retried with new
    ones. ``stop()`` (always called) ends ``up`` and anything it left behind.
    """

    _ATTEMPTS = 3

    def __init__(self, workdir: Path, routes: Sequence[Route], env: Mapping[str, str]) -> None:
        self.name = workdir.name
        self.workdir = workdir
        self.routes = list(routes)
        self.env = base_env(env)
        self.config_path = workdir / "gateway.yaml"
        self.log = workdir / "up.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.children: list[Child] = []
        self.listener_port = self.admin_port = self.extproc_port = 0
        workdir.mkdir(parents=True, exist_ok=True)

    def _write_config(self) -> None:
        ports: list[int] = []
        while len(ports) < 3:
            if (port := free_port()) not in ports:
                ports.append(port)
        self.listener_port, self.admin_port, self.extproc_port = ports
        config = {
            "listener": {"address": "127.0.0.1", "port": self.listener_port},
            "admin": {"address": "127.0.0.1", "port": self.admin_port},
            "extproc": {"address": "127.0.0.1", "port": self.extproc_port, "timeout_ms": 5000},
            "routes": self.routes,
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listener_port}"

    def start(self) -> UpProcess:
        for attempt in range(1, self._ATTEMPTS + 1):
            self._write_config()
            self._spawn()
            try:
                self._wait_ready()
            except processes.NotReady as exc:
                lost_port = any(m in self.output().lower() for m in _BIND_FAILURES)
                self.stop()
                if attempt == self._ATTEMPTS or not lost_port:
                    raise processes.NotReady(f"{exc}\n{self.report()}") from exc
                continue
            self.children = children(self._pid())
            return self
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        command = [sys.executable, "-m", "extproc", "up", str(self.config_path)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=ROOT,
            )  # fmt: skip

    def _pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _wait_ready(self) -> None:
        assert self.process is not None
        admin = Endpoint("127.0.0.1", self.admin_port)
        processes.wait_envoy_ready(admin, DEADLINE_S * 2, self.process)
        end = time.monotonic() + DEADLINE_S * 2
        while not accepts_connections(self.listener_port):
            if self.process.poll() is not None:
                raise processes.NotReady(f"up exited with {self.process.returncode}")
            if any(m in self.output().lower() for m in _BIND_FAILURES):
                raise processes.NotReady(f"envoy cannot bind port {self.listener_port}")
            if time.monotonic() > end:
                raise processes.NotReady(f"nothing listening on {self.listener_port}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        os.kill(self._pid(), signum)

    def wait(self, deadline_s: float) -> int:
        assert self.process is not None
        return self.process.wait(deadline_s)

    def stop(self) -> None:
        """SIGTERM ``up``; SIGKILL it and its children if that does not end them."""
        process, self.process = self.process, None
        if process is None:
            return
        left = self.children or children(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for child in left:
            if child.alive():
                os.kill(child.pid, signal.SIGKILL)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def report(self) -> str:
        config = self.config_path.read_text() if self.config_path.exists() else ""
        tail = "\n".join(self.output().splitlines()[-200:])
        return f"--- {self.config_path}\n{config}\n--- {self.log} (last 200 lines)\n{tail}"


@contextmanager
def running_up(
    workdir: Path, upstream: RecordingUpstream, watch: Callable[..., None], server_key: str
) -> Iterator[UpProcess]:
    """``up`` with one credential route to ``upstream``; stopped (held streams let go) after."""
    process = UpProcess(
        workdir, [credential_route("anthropic", upstream.url())], env={"ANTHROPIC_KEY": server_key}
    )
    watch(process)
    try:
        yield process.start()
    finally:
        upstream.sse_release.set()  # a failed test must not leave streams held
        process.stop()


def accepts_connections(port: int) -> bool:
    """True if something accepts a TCP connection on 127.0.0.1:``port``; False if refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


# -- leaks --------------------------------------------------------------------------------------


def files_under(folder: Path, skip: Collection[Path] = ()) -> dict[str, bytes]:
    """Every regular file below ``folder`` (hidden ones too), by path; ``skip`` left out."""
    skipped = {path.resolve() for path in skip}
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.resolve() not in skipped and not path.is_symlink():
            found[str(path)] = path.read_bytes()
    return found


def find_leaks(sources: Mapping[str, bytes], needles: Mapping[str, str]) -> list[str]:
    """``"<source>: <needle label>"`` for every needle found in a source."""
    return [
        f"{where}: {label}"
        for where, data in sources.items()
        for label, needle in needles.items()
        if needle.encode() in data
    ]


def lines_with(text: str, needle: str) -> Iterator[str]:
    return (line for line in text.splitlines() if needle in line)
