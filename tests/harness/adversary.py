"""Tools for the adversarial tests: keys files, leak checks, hostile HTTP/2, metrics, sockets.

Kept apart from the rest of the harness so the adversarial suite can grow
without touching what the other end-to-end tests rely on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.clients import (
    TIMEOUT_S,
    HeaderLines,
    RawResponse,
    as_bytes,
    h2_exchange,
    http1_message,
    parse_response,
    read_all,
)
from harness.gateway import ROOT, GatewayStartError, base_env
from harness.keys import key_line

T = TypeVar("T")

# -- waiting --------------------------------------------------------------------------------


def poll(check: Callable[[], T | None], what: str, deadline_s: float = 15.0) -> T:
    """``check()``'s first truthy result; raises AssertionError naming ``what`` at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"still not {what} after {deadline_s:.0f}s")
        time.sleep(0.05)


def start_retrying(start: Callable[[], T], attempts: int = 3) -> T:
    """Run ``start`` again when a port a test picked itself was taken meanwhile.

    The gateway fixture already retries for the ports it picks; a metrics port
    chosen by a test is outside that loop.
    """
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except GatewayStartError as exc:
            if attempt == attempts or "already in use" not in str(exc).lower():
                raise
    raise AssertionError("unreachable")


# -- gateway keys -----------------------------------------------------------------------------


def replace_text(path: Path, text: str) -> None:
    """Replace a watched file atomically (temporary name, then rename)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def write_keys(path: Path, keys: Mapping[str, str]) -> None:
    """Write a keys file for ``{name: key}`` atomically."""
    replace_text(path, "".join(key_line(name, key) + "\n" for name, key in keys.items()))


def keygen(name: str, keys_file: Path) -> str:
    """Run ``python -m extproc keygen NAME --append FILE`` and return the printed key."""
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "keygen", name, "--append", str(keys_file)],
        env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return next(word for word in done.stdout.split() if word.startswith("gk-"))


# -- leaks ----------------------------------------------------------------------------------


def leaks(secrets: Iterable[str | bytes], *blobs: bytes | str | None) -> list[str]:
    """The secrets that occur in any of ``blobs`` (headers flattened, bodies, logs)."""
    found = []
    for secret in secrets:
        needle = secret.encode() if isinstance(secret, str) else secret
        for blob in blobs:
            data = blob.encode("latin-1", "replace") if isinstance(blob, str) else blob or b""
            if needle in data:
                found.append(needle.decode("latin-1"))
                break
    return found


def flatten(headers: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
    """Header pairs as one blob, for ``leaks``."""
    out = b""
    for name, value in headers:
        out += as_bytes(name) + b": " + as_bytes(value) + b"\n"
    return out


# -- HTTP/1.1 exactly as given -----------------------------------------------------------------


def http1_exact(
    port: int,
    target: str,
    headers: HeaderLines = (),
    *,
    method: str = "GET",
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> RawResponse | None:
    """One HTTP/1.x request to 127.0.0.1:``port`` with exactly these header lines.

    Unlike ``raw_request`` no ``Host`` is added (a test of Host spoofing gives
    its own, once or twice); only ``Content-Length`` for a body and
    ``Connection: close``. None when the gateway reset the connection instead
    of answering.
    """
    payload = http1_message(f"{method} {target} {version}", headers, body, bool(body))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as conn:
            conn.sendall(payload)
            data = read_all(conn)
    except (ConnectionResetError, BrokenPipeError):
        return None
    return parse_response(data) if data else None


# -- HTTP/2 with any :authority and any header bytes --------------------------------------------


@dataclass(frozen=True)
class H2Reply:
    """What one hostile HTTP/2 request got; ``status`` None means the stream was refused."""

    status: int | None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""

    @property
    def refused(self) -> bool:
        return self.status is None


def h2_request(
    port: int,
    target: str,
    headers: HeaderLines = (),
    *,
    authority: str | bytes = "127.0.0.1",
    method: str = "GET",
) -> H2Reply:
    """One h2c request to 127.0.0.1:``port`` with ``:authority`` and headers sent as given.

    Unlike ``raw_h2_request`` the connection always goes to loopback whatever
    the authority says, and the response headers are returned too.
    """
    answer = h2_exchange("127.0.0.1", port, target, headers, method=method, authority=authority)
    if answer.end == "refused" or not answer.status:
        return H2Reply(None)  # a reset, or the connection closed before any response
    return H2Reply(answer.status, answer.headers, answer.body)


# -- health -------------------------------------------------------------------------------------

CONFIG_HEALTH = "credential-gateway.config"  # NOT_SERVING while a broken change is ignored
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def config_health(address: str) -> int:
    """The processor's health status for the config service (health_pb2 enum value)."""
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=CONFIG_HEALTH)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status)


# -- metrics ------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^gateway_decisions_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> str:
    """The processor's Prometheus text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def decisions(text: str) -> dict[tuple[str, str, str], float]:
    """``gateway_decisions_total`` samples by (route, outcome, client)."""
    found = {}
    for match in _SAMPLE.finditer(text):
        labels: dict[str, Any] = dict(_LABEL.findall(match["labels"]))
        key = (labels.get("route", ""), labels.get("outcome", ""), labels.get("client", ""))
        found[key] = float(match["value"])
    return found


# -- listening sockets --------------------------------------------------------------------------

_LISTEN = "0A"


@dataclass(frozen=True)
class ListeningSocket:
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def listening_sockets(pid: int) -> list[ListeningSocket]:
    """Every TCP socket ``pid`` holds in LISTEN state, from /proc (no psutil needed).

    A socket belongs to the process when one of its file descriptors links to
    ``socket:[inode]``; /proc/net/tcp{,6} gives the inode's state and address.
    """
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table, decode in (("tcp", _ipv4), ("tcp6", _ipv6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and inode in inodes:
                address, port = local.split(":")
                found.append(ListeningSocket(decode(address), int(port, 16)))
    return found


def _ipv4(hex_address: str) -> str:
    # /proc prints the 32-bit address as the host-order integer: little-endian bytes here
    return str(ipaddress.IPv4Address(bytes.fromhex(hex_address)[::-1]))


def _ipv6(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)  # four 32-bit words, each in host order
    address = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    # an IPv6 socket bound to ::ffff:127.0.0.1 (as grpcio does) is reachable as 127.0.0.1 only
    return str(address.ipv4_mapped or address)


def local_addresses() -> list[str]:
    """This machine's own non-loopback addresses (IPv4 and global IPv6), from /proc.

    A service bound to loopback must refuse connections to these even though
    the packets never leave the machine: the destination address is what counts.
    """
    found: list[str] = []
    with contextlib.suppress(OSError):
        previous = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            if "/32 host LOCAL" in line and previous:
                found.append(previous)
            previous = line.split("|-- ")[1].strip() if "|-- " in line else ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    addresses = {ipaddress.ip_address(a) for a in found}
    usable = [a for a in addresses if not (a.is_loopback or a.is_link_local or a.is_unspecified)]
    return sorted(str(a) for a in usable)


def accepts_connections(address: str, port: int) -> bool:
    """True if a TCP connection to ``address``:``port`` is accepted."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect((address, port))
        except OSError:
            return False
        return True


# -- a processor that answers whatever a test wants -------------------------------------------

PROCESS_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


class RogueProcessor:
    """An ext_proc server on ``port`` that answers every request-headers message with ``answer``.

    It stands in for a buggy or compromised processor, to show what Envoy's
    mutation rules let through. ``answer`` may be replaced between requests.
    """

    def __init__(self, port: int, answer: bytes) -> None:
        self.answer = answer
        self.port = port
        self.name = "rogue-processor"
        self.seen = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        method = grpc.stream_stream_rpc_method_handler(self._process)  # bytes in, bytes out
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(PROCESS_SERVICE, {"Process": method})]
        )

    def _process(
        self, requests: Iterable[bytes], _context: grpc.ServicerContext
    ) -> Iterable[bytes]:
        for _request in requests:
            self.seen += 1
            yield self.answer
            return

    def __enter__(self) -> RogueProcessor:
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.stop(0).wait()

    def report(self) -> str:
        return f"rogue processor on {self.port}: {self.seen} request(s)"
