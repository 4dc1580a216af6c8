"""Clients for the gateway: httpx for HTTP/1.1 and HTTP/2, raw sockets for the rest.

httpx normalises what it sends (lower-cases names, refuses non-ASCII values,
folds nothing twice), which is right for an SDK and wrong for a test of what
odd clients do. ``raw_request`` sends header lines byte for byte.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx

TIMEOUT_S = 15.0

HeaderLines = Sequence[tuple[str | bytes, str | bytes]]


def http1(base_url: str, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    """An HTTP/1.1 client (plain or over TLS)."""
    return httpx.Client(
        base_url=base_url, http1=True, http2=False, timeout=TIMEOUT_S, verify=verify
    )


def http2(base_url: str, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    """An HTTP/2-only client: ALPN h2 over TLS, prior knowledge (h2c) over plain TCP.

    Envoy's listener uses codec AUTO, which accepts the h2c connection preface.
    """
    return httpx.Client(
        base_url=base_url, http1=False, http2=True, timeout=TIMEOUT_S, verify=verify
    )


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: tuple[tuple[str, bytes], ...]
    body: bytes

    def header(self, name: str) -> bytes | None:
        lower = name.lower()
        return next((value for key, value in self.headers if key.lower() == lower), None)

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    port: int,
    target: str,
    headers: HeaderLines = (),
    *,
    method: str = "GET",
    body: bytes = b"",
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
) -> RawResponse:
    """Send one HTTP/1.1 request exactly as given and read the whole response.

    ``headers`` are sent in order, as given (str is encoded as Latin-1, so
    ``"caf\\xe9"`` sends the single byte 0xE9). ``Host``, ``Content-Length``
    and ``Connection: close`` are added; the server closes after answering.
    """
    sized = bool(body) or method in ("POST", "PUT", "PATCH")
    payload = http1_message(f"{method} {target} HTTP/1.1", [("Host", host), *headers], body, sized)
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as plain:
        conn = tls.wrap_socket(plain, server_hostname=host) if tls else plain
        conn.sendall(payload)
        return parse_response(read_all(conn))


def http1_message(start_line: str, headers: HeaderLines, body: bytes, sized: bool) -> bytes:
    """An HTTP/1.x request with the header lines in order, exactly as given.

    Only ``Content-Length`` (when ``sized``) and ``Connection: close`` are
    added, so the server closes after answering and a reader reads to the end.
    """
    lines = [start_line.encode()]
    lines += [as_bytes(name) + b": " + as_bytes(value) for name, value in headers]
    if sized:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def as_bytes(value: str | bytes) -> bytes:
    """Bytes as given; str as Latin-1, so ``"caf\\xe9"`` is the single byte 0xE9."""
    return value.encode("latin-1") if isinstance(value, str) else value


def read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = []
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1"), value.strip()))
    response = RawResponse(int(status_line.split()[1]), tuple(headers), body)
    if (response.header("transfer-encoding") or b"").lower() == b"chunked":
        response = RawResponse(response.status, response.headers, _dechunk(body))
    return response


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + rest[:size], rest[size + 2 :]


@dataclass(frozen=True)
class H2Result:
    """What one raw HTTP/2 request got: a response, or a reset of the stream/connection."""

    status: int | None  # None when the gateway refused the request with a reset
    body: bytes = b""

    @property
    def refused(self) -> bool:
        return self.status is None


def raw_h2_request(
    port: int, target: str, headers: HeaderLines = (), *, host: str = "127.0.0.1"
) -> H2Result:
    """One HTTP/2 (h2c prior knowledge) GET with headers sent exactly as given.

    The h2 library normally lower-cases and validates names; here both are off,
    so a test can send what a broken or hostile client would.
    """
    answer = h2_exchange(host, port, target, headers, method="GET", authority=host)
    return H2Result(answer.status, answer.body) if answer.end == "ended" else H2Result(None)


@dataclass(frozen=True)
class H2Exchange:
    """What came back on stream 1 of a raw HTTP/2 request, and how the exchange ended."""

    end: str  # "ended" (the stream ended), "refused" (a reset) or "closed" (the socket closed)
    status: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


def h2_exchange(
    connect_to: str,
    port: int,
    target: str,
    headers: HeaderLines,
    *,
    method: str,
    authority: str | bytes,
) -> H2Exchange:
    """One h2c request on stream 1, read until the stream ends or is refused.

    ``:authority`` and the headers are sent as given: the h2 library's
    lower-casing and validation are off, so a test can send what a broken or
    hostile client would.
    """
    config = h2.config.H2Configuration(
        client_side=True, normalize_outbound_headers=False, validate_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config)
    request = [(b":method", method.encode()), (b":scheme", b"http"),
               (b":authority", as_bytes(authority)), (b":path", target.encode())]  # fmt: skip
    request += [(as_bytes(name), as_bytes(value)) for name, value in headers]
    with socket.create_connection((connect_to, port), timeout=TIMEOUT_S) as sock:
        conn.initiate_connection()
        conn.send_headers(1, request, end_stream=True)
        sock.sendall(conn.data_to_send())
        return _h2_read(sock, conn)


def _h2_read(sock: socket.socket, conn: h2.connection.H2Connection) -> H2Exchange:
    status: int | None = None
    response: tuple[tuple[bytes, bytes], ...] = ()
    body = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return H2Exchange("refused")
        if not data:
            return H2Exchange("closed", status, response, body)
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                response = tuple((bytes(k), bytes(v)) for k, v in event.headers)
                status = int(dict(response)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                return H2Exchange("ended", status, response, body)
            elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                return H2Exchange("refused")
        sock.sendall(conn.data_to_send())


def sse_events(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream into SSE events (each ending in a blank line), as they arrive."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield event + b"\n\n"
