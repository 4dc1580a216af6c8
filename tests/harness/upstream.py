"""A recording upstream: an HTTP/1.1 server on 127.0.0.1 that remembers every request.

The gateway's promises are about what reaches the provider, so the tests look
at it from the provider's side: each request is recorded with its headers as
an ordered list of (name, raw bytes) exactly as they arrived on the wire. That
lets a test assert byte-for-byte pass-through, duplicates and non-UTF-8 bytes.

It is written on raw sockets (not http.server) because http.server decodes and
folds headers before anyone can look at them.

Paths it understands (after the gateway's prefix rewrite):

- ``/sse``: ``text/event-stream``, one chunk per event, flushed at once.
  ``?events=N`` (default 3), ``?pause_ms=M`` between events (default 300) and
  ``?hold=1``: after the first event, wait until the test sets ``sse_release``,
  so a test can prove the client saw event 1 while the upstream was still busy.
- ``/redirect``: a 3xx (``?status=302``) to ``?location=`` (default ``/elsewhere``).
- ``/status/NNN``: a JSON reply with that status.
- anything else: 200 JSON naming the upstream and the path.

A ``responder`` replaces all of these (``harness.fakeapi`` answers like the real
Anthropic and OpenAI APIs); its ``Reply`` may stream, with ``chunks``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

_MAX_LINE = 65536
_HOLD_LIMIT_S = 20.0  # a held SSE stream gives up waiting for the test after this


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the upstream received it."""

    method: str
    target: str  # the request-target as sent, e.g. "/v1/messages?beta=true"
    headers: tuple[tuple[str, bytes], ...]  # (name as sent, raw value), in arrival order
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def values(self, name: str) -> list[bytes]:
        """Every value of header ``name`` (any case), in arrival order."""
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    def has(self, name: str) -> bool:
        return bool(self.values(name))

    def names(self) -> list[str]:
        return [key for key, _ in self.headers]


@dataclass(frozen=True)
class Reply:
    """What a custom responder wants sent back."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    # instead of body: sent chunked, one write each (an iterator may wait between chunks)
    chunks: Iterable[bytes] | None = None


Responder = Callable[[RecordedRequest], Reply]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, upstream: RecordingUpstream) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.upstream._serve_connection(self.request)


class RecordingUpstream:
    """Start with ``start()`` (or as a context manager); read ``requests``; ``stop()``."""

    def __init__(
        self,
        name: str = "upstream",
        tls: ssl.SSLContext | None = None,
        responder: Responder | None = None,
    ) -> None:
        self.name = name
        self.responder = responder  # overrides the built-in paths when set
        self.sse_release = threading.Event()  # set by a test to let a held SSE stream go on
        self.sse_finished = threading.Event()  # set once an SSE stream has sent every event
        self._tls = tls
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._handshake_failures = 0
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> RecordingUpstream:
        self._server = _Server(self)
        threading.Thread(
            target=self._server.serve_forever, name=f"{self.name}-accept", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # Envoy keeps pooled connections open: end them
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server = None

    def __enter__(self) -> RecordingUpstream:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- what tests read -----------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.server_address[1]
        return port

    def url(self, host: str = "127.0.0.1") -> str:
        """The URL to put in a route's ``upstream:`` (use host ``localhost`` for TLS)."""
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def handshake_failures(self) -> int:
        """TLS handshakes that failed (e.g. the gateway did not trust our certificate)."""
        with self._lock:
            return self._handshake_failures

    def wait_handshake_failures(self, count: int, deadline_s: float = 10.0) -> int:
        """Wait until at least ``count`` handshakes failed (the client may notice first)."""
        end = time.monotonic() + deadline_s
        while (failures := self.handshake_failures) < count:
            if time.monotonic() > end:
                raise AssertionError(f"{self.name}: {failures} TLS handshake failures, not {count}")
            time.sleep(0.02)
        return failures

    def only_request(self) -> RecordedRequest:
        """The single request received since the last ``clear()``; fails otherwise."""
        requests = self.requests
        assert len(requests) == 1, f"{self.name} received {len(requests)} requests: {requests}"
        return requests[0]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._handshake_failures = 0
        self.sse_release.clear()
        self.sse_finished.clear()

    def report(self) -> str:
        """A readable summary for a failed test's report."""
        lines = [
            f"{self.name} on port {self._server and self.port}: {len(self.requests)} request(s)"
        ]
        for request in self.requests:
            lines.append(f"  {request.method} {request.target}")
            lines.extend(f"    {name}: {value!r}" for name, value in request.headers)
        lines.append(f"  TLS handshake failures: {self.handshake_failures}")
        return "\n".join(lines)

    # -- serving ---------------------------------------------------------------------------

    def _serve_connection(self, raw: socket.socket) -> None:
        conn = self._handshake(raw)
        if conn is None:
            return
        with self._lock:
            self._connections.add(conn)
        try:
            reader = conn.makefile("rb")
            while (request := _read_request(reader)) is not None:
                with self._lock:
                    self._requests.append(request)
                if not self._respond(conn, request):
                    break
        except (OSError, ValueError):
            pass  # the peer went away or sent garbage: nothing to record
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _handshake(self, raw: socket.socket) -> socket.socket | None:
        if self._tls is None:
            return raw
        raw.settimeout(10)
        try:
            conn = self._tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            with self._lock:
                self._handshake_failures += 1
            raw.close()
            return None
        conn.settimeout(None)
        return conn

    def _respond(self, conn: socket.socket, request: RecordedRequest) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        keep_alive = b"close" not in b",".join(request.values("connection")).lower()
        query = {
            key: values[-1] for key, values in parse_qs(urlsplit(request.target).query).items()
        }
        if self.responder is not None:
            reply = self.responder(request)
        elif request.path == "/sse":
            self._stream_events(conn, query)
            return keep_alive
        elif request.path == "/redirect":
            location = query.get("location", "/elsewhere")
            reply = Reply(int(query.get("status", "302")), headers=(("location", location),))
        elif request.path.startswith("/status/"):
            status = int(request.path.removeprefix("/status/"))
            reply = Reply(status, json.dumps({"upstream": self.name, "status": status}).encode())
        else:
            body = {"upstream": self.name, "path": request.path}
            reply = Reply(200, json.dumps(body).encode())
        if reply.chunks is not None:
            conn.sendall(_head(reply.status, [*reply.headers, ("transfer-encoding", "chunked")]))
            for data in reply.chunks:
                conn.sendall(_chunk(data))
            conn.sendall(b"0\r\n\r\n")
            return keep_alive
        conn.sendall(
            _head(reply.status, [*reply.headers, ("content-length", str(len(reply.body)))])
            + reply.body
        )
        return keep_alive

    def _stream_events(self, conn: socket.socket, query: dict[str, str]) -> None:
        count = int(query.get("events", "3"))
        pause = int(query.get("pause_ms", "300")) / 1000
        headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("transfer-encoding", "chunked"),
        ]
        conn.sendall(_head(200, headers) + _chunk(sse_event(1)))
        if query.get("hold") == "1":
            self.sse_release.wait(_HOLD_LIMIT_S)
        for number in range(2, count + 1):
            time.sleep(pause)  # the pause between events is what is being streamed, not a wait
            conn.sendall(_chunk(sse_event(number)))
        self.sse_finished.set()  # before the final chunk: a client at end-of-stream sees it set
        conn.sendall(b"0\r\n\r\n")


def sse_event(number: int) -> bytes:
    """The bytes of event ``number`` as the upstream sends it."""
    data = json.dumps({"n": number})
    return f"event: message\ndata: {data}\n\n".encode()


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect",
            308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized",
            404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}  # fmt: skip


def _read_request(reader: BinaryIO) -> RecordedRequest | None:
    """One HTTP/1.1 request from ``reader``; None at a clean end of the connection."""
    line = reader.readline(_MAX_LINE)
    if not line:
        return None
    method, target, _version = line.rstrip(b"\r\n").decode("latin-1").split(" ", 2)
    headers: list[tuple[str, bytes]] = []
    while (line := reader.readline(_MAX_LINE)) not in (b"\r\n", b"\n", b""):
        name, _, value = line.rstrip(b"\r\n").partition(b":")
        headers.append((name.decode("latin-1"), value.strip(b" \t")))
    request = RecordedRequest(method, target, tuple(headers), b"")
    body = _read_body(reader, request)
    return RecordedRequest(method, target, tuple(headers), body)


def _read_body(reader: BinaryIO, request: RecordedRequest) -> bytes:
    if b"chunked" in b",".join(request.values("transfer-encoding")).lower():
        body = b""
        while size := int(reader.readline(_MAX_LINE).split(b";")[0], 16):
            body += reader.read(size)
            reader.readline(_MAX_LINE)
        while reader.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return body
    length = request.values("content-length")
    return reader.read(int(length[0])) if length else b""
