"""The lean HTTP/2 server against a hostile local peer, frame by frame (issue 11).

Each test starts the real server (uvloop, as ``serve`` runs it) in a process of
its own, a probe in another process (grpcio's client calling the gRPC health
Check every few milliseconds on its own connection, timing each call itself),
and attacks from this process over raw sockets to 127.0.0.1: bounded loops,
ports picked by the kernel, so two runs can go at once. Every test asserts:

- the probe was answered in time on every call during and after the attack (and
  made calls during it): within LATENCY_FACTOR times the 90th percentile of its
  own calls just before the attack, on the same machine under the same load, or
  LATENCY_FLOOR_S if that is more. A starved probe waits for the flood (seconds:
  without the work budget the worst call is 2.3-3.1 s on a quiet machine); a machine
  that other tests load delays single calls by a scheduler's slices (up to 415 ms
  seen at load 12 on 2 cores, baseline median 1.8 ms), hence the floor;
- the server's peak RSS stayed under its start-up RSS + RSS_GROWTH_BOUND_MB;
- the attacker got the error RFC 9113 (or gRPC) names for what it did.

A hypothesis test at the end drives one connection in-process with random frame
sequences and checks that no exception escapes and the bookkeeping invariants hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import hpack
import pytest
from grpc_health.v1 import health_pb2
from harness.gateway import ROOT, base_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.server import h2wire as w
from extproc.server.h2server import (
    CONNECTION_WINDOW,
    MAX_HEADER_FRAMES,
    MAX_STREAMS,
    STREAM_WINDOW,
    GrpcConnection,
    Limits,
    Pool,
)
from extproc.server.lean_backend import HEALTH_CHECK_PATH

ATTACK_S = 1.5  # how long each flood lasts at most
LATENCY_FACTOR = 10  # each probe call, against the 90th percentile of the baseline calls
LATENCY_FLOOR_S = ATTACK_S * 2 / 3  # ... or this, if more: "not starved", below a flood's length
BASELINE_CALLS = 50  # probe calls timed before the attack, paced like the ones during it
RSS_GROWTH_BOUND_MB = 48  # peak RSS over the RSS after start-up (and the memory budget, if set)
OPEN_PATH = b"/test.Echo/Open"  # answers each message with itself and keeps the call open
BOOM_PATH = b"/test.Echo/Boom"  # its handler raises

SERVER_SCRIPT = """
import asyncio, json, sys
from extproc.server.h2server import GrpcServer, Limits
from extproc.server.lean_backend import HEALTH_CHECK_PATH, Health, _event_loop

def boom(message):
    raise RuntimeError("a handler bug")

health = Health()
health.set("", True)
methods = {HEALTH_CHECK_PATH: health.check, b"/test.Echo/Open": lambda m: (m, None, ""),
           b"/test.Echo/Boom": boom}
loop = _event_loop()
server = GrpcServer(methods, Limits(**json.loads(sys.argv[1])))
loop.run_until_complete(server.start("127.0.0.1", 0, False))
print(server.port, flush=True)
loop.run_forever()
"""

PROBE_SCRIPT = """
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

channel = grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}")
stub = health_pb2_grpc.HealthStub(channel)
request = health_pb2.HealthCheckRequest(service="")
stub.Check(request, timeout=10)  # connected and warm: not measured
phase = {"name": "during"}
results = {"baseline": [], "during": [], "after": [], "errors": []}
for _ in range(int(sys.argv[2])):  # the baseline: this machine, now, nobody attacking
    start = time.perf_counter()
    stub.Check(request, timeout=10)
    results["baseline"].append(time.perf_counter() - start)
    time.sleep(0.005)

def commands():
    for line in sys.stdin:
        phase["name"] = line.strip()

threading.Thread(target=commands, daemon=True).start()
print("ready", flush=True)
deadline = time.monotonic() + 60
while phase["name"] == "during" and time.monotonic() < deadline:
    start = time.perf_counter()
    try:
        status = stub.Check(request, timeout=5).status
        results["during"].append(time.perf_counter() - start)
        if status != health_pb2.HealthCheckResponse.SERVING:
            results["errors"].append(f"status {status}")
    except grpc.RpcError as exc:
        results["errors"].append(f"{exc.code()} after {time.perf_counter() - start:.3f}s")
    time.sleep(0.005)
for _ in range(20):
    start = time.perf_counter()
    try:
        stub.Check(request, timeout=5)
        results["after"].append(time.perf_counter() - start)
    except grpc.RpcError as exc:
        results["errors"].append(f"after: {exc.code()}")
print(json.dumps(results), flush=True)
"""


# -- frames -----------------------------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")
    return head + payload


def setting(key: int, value: int) -> bytes:
    return key.to_bytes(2, "big") + value.to_bytes(4, "big")


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def health_request(service: str = "") -> bytes:
    return grpc_frame(health_pb2.HealthCheckRequest(service=service).SerializeToString())


def window_update(stream: int, increment: int) -> bytes:
    return frame(w.WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def request_fields(path: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
            (b":authority", b"extproc"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers")]  # fmt: skip


# -- the processes --------------------------------------------------------------------------------


def status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} for process {pid}")


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    limits: dict[str, Any]
    start_rss_kb: int = 0

    def peak_rss_mb(self) -> float:
        return status_kb(self.process.pid, "VmHWM") / 1024

    def alive(self) -> bool:
        return self.process.poll() is None


@contextlib.contextmanager
def running_server(optimize: bool = False, **limits: Any) -> Iterator[Server]:
    """The lean server in a process of its own (uvloop, like ``serve``); ``-O`` if ``optimize``.

    Its log goes to a file (a pipe nobody reads would stall it), shown if the test fails.
    """
    argv = [sys.executable, *(["-O"] if optimize else []), "-c", SERVER_SCRIPT, json.dumps(limits)]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=base_env(), text=True,
                                   stdout=subprocess.PIPE, stderr=log)  # fmt: skip
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.strip().isdigit(), f"server did not start: {line!r}"
            yield Server(process, int(line), limits)
        except BaseException:
            log.seek(0)
            print("server log (end):", log.read()[-3000:])
            raise
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            if process.stdout is not None:
                process.stdout.close()


@dataclass
class ProbeResult:
    baseline: list[float]
    during: list[float]
    after: list[float]
    errors: list[str]

    def bound_s(self) -> float:
        """The longest a call may take: relative to the baseline, or the floor."""
        ranked = sorted(self.baseline)
        p90 = ranked[int(len(ranked) * 0.9)] if ranked else 0.0
        return max(LATENCY_FLOOR_S, LATENCY_FACTOR * p90)

    def summary(self) -> str:
        worst = max(self.during + self.after, default=0.0)
        base = statistics.median(self.baseline) if self.baseline else 0.0
        return f"{len(self.during)} calls during, {len(self.after)} after, worst {worst * 1000:.1f} ms (bound {self.bound_s() * 1000:.0f} ms; baseline median {base * 1000:.2f} ms, worst {max(self.baseline, default=0) * 1000:.1f} ms), errors {self.errors[:5]}"  # fmt: skip


class Probe:
    """A grpcio client in its own process: Check calls on its own connection, timed there."""

    def __init__(self, port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROBE_SCRIPT, str(port), str(BASELINE_CALLS)], cwd=ROOT, env=base_env(),
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        assert ready.strip() == "ready", f"probe did not start: {ready!r} {self.process.stderr and self.process.stderr.read()}"  # fmt: skip

    def finish(self) -> ProbeResult:
        out, err = self.process.communicate("after\n", timeout=60)
        assert self.process.returncode == 0, f"probe failed: {err[-2000:]}"
        return ProbeResult(**json.loads(out.strip().splitlines()[-1]))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=5)


def others_are_served(server: Server, attack: Callable[[], None], memory_budget_mb: float = 0) -> ProbeResult:  # fmt: skip
    """Run ``attack`` while the probe calls; assert latency and RSS; return what the probe saw."""
    probe = Probe(server.port)
    try:
        server.start_rss_kb = status_kb(server.process.pid, "VmRSS")
        started = time.monotonic()
        attack()
        attack_s = time.monotonic() - started
        result = probe.finish()
    finally:
        probe.kill()
    assert server.alive(), "the server died"
    assert not result.errors, result.summary()
    assert result.during, f"no probe call during the {attack_s:.2f}s attack"
    assert result.after, result.summary()
    worst = max(result.during + result.after)
    assert worst < result.bound_s(), result.summary()
    bound_mb = server.start_rss_kb / 1024 + RSS_GROWTH_BOUND_MB + memory_budget_mb
    assert server.peak_rss_mb() < bound_mb, f"peak RSS {server.peak_rss_mb():.1f} MB ≥ {bound_mb:.1f} MB"  # fmt: skip
    print(f"probe: {result.summary()}; peak RSS {server.peak_rss_mb():.1f} MB (start {server.start_rss_kb / 1024:.1f} MB)")  # fmt: skip
    return result


# -- the attacker -----------------------------------------------------------------------------


@dataclass
class Seen:
    """What the attacker received, as the reader thread parsed it (bounded)."""

    goaway: int | None = None
    goaway_at: float = 0.0  # time.monotonic() when the GOAWAY was read
    resets: dict[int, int] = field(default_factory=dict)
    statuses: dict[int, bytes] = field(default_factory=dict)  # grpc-status by stream
    messages: dict[int, bytes] = field(default_factory=dict)  # grpc-message by stream
    data: dict[int, int] = field(default_factory=dict)  # DATA bytes by stream
    blocks: list[bytes] = field(default_factory=list)  # the first header blocks, raw
    ping_acks: int = 0
    settings_acks: int = 0
    frames_after_goaway: int = 0
    closed: bool = False
    decode_error: str = ""


class Attacker:
    """A raw HTTP/2 client; a thread reads and parses everything the server sends."""

    def __init__(self, port: int, settings: bytes = b"", first: bytes | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.seen = Seen()
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.send(w.PREFACE + (frame(w.SETTINGS, 0, 0, settings) if first is None else first))

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def headers(self, stream: int, path: bytes, flags: int = w.END_HEADERS) -> bytes:
        return frame(w.HEADERS, flags, stream, self.encoder.encode(request_fields(path)))

    def call(self, stream: int, path: bytes, message: bytes, end: bool = True) -> bytes:
        return self.headers(stream, path) + frame(w.DATA, w.END_STREAM if end else 0, stream, message)  # fmt: skip

    def flood(self, blob: bytes, seconds: float = ATTACK_S, max_bytes: int = 512 << 20) -> int:
        """Send ``blob`` again and again for ``seconds``; stops when the server stops reading."""
        sent, end = 0, time.monotonic() + seconds
        self.sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
            while time.monotonic() < end and sent < max_bytes:
                self.sock.sendall(blob)
                sent += len(blob)
        self.sock.settimeout(5)
        return sent

    def wait(self, check: Callable[[Seen], object], what: str, deadline_s: float = 10.0) -> None:
        end = time.monotonic() + deadline_s
        with self.changed:
            while not check(self.seen):
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"attacker: no {what} after {deadline_s}s: {self.seen.goaway=} closed={self.seen.closed}")  # fmt: skip
                self.changed.wait(min(left, 0.2))

    def goaway(self) -> int:
        self.wait(lambda s: s.goaway is not None, "GOAWAY")
        assert self.seen.goaway is not None
        return self.seen.goaway

    def alive(self) -> None:
        """A PING round trip: the server still serves this connection."""
        acked = self.seen.ping_acks
        self.send(frame(w.PING, 0, 0, b"still-up"))
        self.wait(lambda s: s.ping_acks > acked, "PING ACK")
        assert self.seen.goaway is None, f"GOAWAY {self.seen.goaway}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join(5)

    def _read(self) -> None:
        unread = bytearray()
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:  # the socket's timeout is for sending; reading waits on
                continue
            except OSError:
                data = b""
            if not data:
                with self.changed:
                    self.seen.closed = True
                    self.changed.notify_all()
                return
            unread += data
            at = 0
            with self.changed:
                while len(unread) - at >= 9:
                    size = int.from_bytes(unread[at : at + 3], "big")
                    if len(unread) - at < 9 + size:
                        break
                    kind, flags = unread[at + 3], unread[at + 4]
                    stream = int.from_bytes(unread[at + 5 : at + 9], "big") & 0x7FFFFFFF
                    self._on_frame(kind, flags, stream, bytes(unread[at + 9 : at + 9 + size]))
                    at += 9 + size
                del unread[:at]
                self.changed.notify_all()

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        seen = self.seen
        if seen.goaway is not None:
            seen.frames_after_goaway += 1
        if kind == w.GOAWAY:
            seen.goaway = int.from_bytes(payload[4:8], "big")
            seen.goaway_at = time.monotonic()
        elif kind == w.RST_STREAM:
            seen.resets[stream] = int.from_bytes(payload, "big")
        elif kind == w.DATA:
            seen.data[stream] = seen.data.get(stream, 0) + len(payload)
        elif kind == w.PING and flags & w.ACK:
            seen.ping_acks += 1
        elif kind == w.SETTINGS and flags & w.ACK:
            seen.settings_acks += 1
        elif kind == w.HEADERS:
            if len(seen.blocks) < 100:
                seen.blocks.append(payload)
            try:
                fields = dict(self.decoder.decode(payload, raw=True))
            except hpack.HPACKError as exc:
                seen.decode_error = repr(exc)
                return
            if b"grpc-status" in fields:
                seen.statuses[stream] = fields[b"grpc-status"]
                seen.messages[stream] = fields.get(b"grpc-message", b"")


@contextlib.contextmanager
def attacker(port: int, settings: bytes = b"", first: bytes | None = None) -> Iterator[Attacker]:
    peer = Attacker(port, settings, first)
    try:
        yield peer
    finally:
        peer.close()


def until(seconds: float) -> Iterator[int]:
    """0, 1, 2, ... for ``seconds`` (and at least once)."""
    end, i = time.monotonic() + seconds, 0
    while i == 0 or time.monotonic() < end:
        yield i
        i += 1


# -- 1. errors on the wire, never an exception out of the server ---------------------------------


def test_long_error_texts_and_failing_handlers_fail_only_their_call() -> None:
    """Long, slash-ridden and non-UTF-8 texts in grpc-message, a handler bug: that call's
    error only (NOT_FOUND, UNIMPLEMENTED, INTERNAL), the connection serves on; under -O."""
    service = "/" * 3000 + "é"
    cases = [(health_request(service), HEALTH_CHECK_PATH, b"5"),
             (health_request(), b"/a" * 400, b"12"),
             (health_request(), b"/\xff\xfe/\xc3", b"12"),
             (health_request(), BOOM_PATH, b"13")]  # fmt: skip
    with running_server(optimize=True) as server, attacker(server.port) as peer:

        def attack() -> None:
            stream = 1
            for _ in until(ATTACK_S):
                for message, path, status in cases:
                    peer.send(peer.call(stream, path, message))
                    peer.wait(lambda s, n=stream: n in s.statuses, f"the end of stream {stream}")
                    assert peer.seen.statuses[stream] == status, (path[:20], peer.seen.statuses[stream])  # fmt: skip
                    stream += 2
            peer.alive()

        others_are_served(server, attack)
        assert not peer.seen.decode_error, peer.seen.decode_error
        texts = {unquote_to_bytes(peer.seen.messages[s]) for s in peer.seen.messages}
        assert f"unknown service {service!r}".encode()[: w.MAX_GRPC_MESSAGE] in texts
        assert any(t.startswith(b"unknown method /a/a") for t in texts)
        assert b"internal error" in texts


# -- 2. no frame walks all streams ------------------------------------------------------------


def test_window_update_and_settings_floods_do_not_walk_waiting_streams() -> None:
    """999 answers waiting for window (own or connection's), then a flood of WINDOW_UPDATE(0, 1),
    empty SETTINGS and initial-window changes; then every answer arrives once windows open."""
    streams = range(1, 2 * (MAX_STREAMS - 1), 2)
    message = grpc_frame(b"m" * 200)
    settings = setting(w.SETTINGS_INITIAL_WINDOW_SIZE, 0)
    with running_server() as server, attacker(server.port, settings) as peer:
        half = [
            s for s in streams if s % 4 == 1
        ]  # these may send: they then wait for the connection
        peer.send(*(peer.call(s, OPEN_PATH, message, end=False) for s in streams),
                  *(window_update(s, 1000) for s in half))  # fmt: skip
        peer.alive()
        toggles = (frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_INITIAL_WINDOW_SIZE, 1))
                   + frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_INITIAL_WINDOW_SIZE, 0)))  # fmt: skip
        blob = window_update(0, 1) * 2000 + frame(w.SETTINGS, 0, 0) * 2000 + toggles * 5

        def attack() -> None:
            peer.flood(blob, max_bytes=1000 * len(blob))
            peer.alive()

        others_are_served(server, attack)
        opened = 64 << 20
        peer.send(frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)),
                  window_update(0, opened))  # fmt: skip
        peer.wait(lambda s: all(s.data.get(n, 0) == len(message) for n in streams), "every answer")  # fmt: skip
        peer.send(window_update(0, w.MAX_WINDOW))  # past 2^31 - 1: the RFC's error
        assert peer.goaway() == w.FLOW_CONTROL_ERROR


# -- 3. HPACK integers and header blocks are capped -------------------------------------------


def test_huge_hpack_integers_and_header_lists_are_compression_errors() -> None:
    """Each block on a fresh connection: COMPRESSION_ERROR (or ENHANCE_YOUR_CALM for too many
    fields), found in bounded time, never an escaped ValueError."""
    blocks = [
        (
            b"\xff" + b"\xff" * 15_000 + b"\x01",
            w.COMPRESSION_ERROR,
        ),  # a 15 KB indexed-field integer
        (
            b"\x7f" + b"\x80" * 8000 + b"\x01",
            w.COMPRESSION_ERROR,
        ),  # the same, in a table-changing field
        (b"\xff\xff\xff\xff\x7f", w.COMPRESSION_ERROR),  # an index within the cap, past the tables
        (b"\x3f\xe2\x1f", w.COMPRESSION_ERROR),  # a table size of 4097, above ours
        (b"\x82" * 5000, w.ENHANCE_YOUR_CALM),  # 5000 fields
        (
            b"\x00\x7f" + b"\xff" * 3 + b"\x7f",
            w.COMPRESSION_ERROR,
        ),  # a string length past the block
    ]
    with running_server() as server:

        def attack() -> None:
            for i in until(ATTACK_S):
                block, code = blocks[i % len(blocks)]
                with attacker(server.port) as peer:
                    head, rest = block[: w.DEFAULT_MAX_FRAME], block[w.DEFAULT_MAX_FRAME :]
                    frames = [frame(w.HEADERS, 0 if rest else w.END_HEADERS, 1, head)]
                    if rest:
                        frames.append(frame(w.CONTINUATION, w.END_HEADERS, 1, rest))
                    peer.send(*frames)
                    assert peer.goaway() == code, (i % len(blocks), peer.seen.goaway)

        others_are_served(server, attack)


# -- 4. a budget of work per read ---------------------------------------------------------------


def _flood_blob(kind: str, peer: Attacker) -> tuple[list[bytes], bytes]:
    """(frames sent once first, the blob repeated) for each flood."""
    if kind == "PING":
        return [], frame(w.PING, 0, 0, b"12345678") * 2000
    if kind == "SETTINGS":
        return [], frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_MAX_FRAME_SIZE, 16384)) * 2000
    if kind == "empty DATA":
        return [peer.headers(1, OPEN_PATH)], frame(w.DATA, 0, 1) * 2000
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["PING", "SETTINGS", "empty DATA", "rapid reset", "CONTINUATION", "HPACK references"])  # fmt: skip
def test_one_flooding_connection_does_not_starve_the_others(kind: str) -> None:
    """Floods of cheap, legal frames: others are answered in time; the flooder is served too."""
    with running_server() as server, attacker(server.port) as peer:

        def attack() -> None:
            if kind in ("rapid reset", "CONTINUATION", "HPACK references"):
                for round_ in until(ATTACK_S):  # fresh streams each round; the encoder follows them
                    first = 1 + round_ * 400
                    blob = b"".join(_streams_flood(kind, peer, first + 2 * i) for i in range(200))
                    try:
                        peer.send(blob)
                    except (BrokenPipeError, ConnectionResetError):
                        break
            else:
                first, blob = _flood_blob(kind, peer)
                peer.send(*first)
                peer.flood(blob)
            peer.alive()

        others_are_served(server, attack)
        assert peer.seen.goaway is None


def _streams_flood(kind: str, peer: Attacker, stream: int) -> bytes:
    if kind == "rapid reset":
        return peer.headers(stream, OPEN_PATH) + frame(w.RST_STREAM, 0, stream, bytes(4))
    if kind == "CONTINUATION":  # the most frames a header block may have, most of them empty
        block = peer.encoder.encode(request_fields(OPEN_PATH))
        empties = frame(w.CONTINUATION, 0, stream) * (MAX_HEADER_FRAMES - 2)
        return (frame(w.HEADERS, 0, stream, block[:3]) + empties
                + frame(w.CONTINUATION, w.END_HEADERS, stream, block[3:])
                + frame(w.RST_STREAM, 0, stream, bytes(4)))  # fmt: skip
    # HPACK references: a request, then 64 references as its (ending) trailers
    return (peer.headers(stream, OPEN_PATH)
            + frame(w.HEADERS, w.END_HEADERS | w.END_STREAM, stream, b"\x82" * 64))  # fmt: skip


# -- 5. connections, idle time and memory are bounded ------------------------------------------


def test_connections_beyond_the_cap_are_sent_away() -> None:
    cap = 8
    with running_server(max_connections=cap) as server:
        held: list[Attacker] = []
        refused = 0

        def attack() -> None:
            nonlocal refused
            try:
                for _ in range(cap - 1):  # the probe holds one
                    held.append(Attacker(server.port))
                for peer in held:
                    peer.alive()
                for _ in until(ATTACK_S):
                    with attacker(server.port) as extra:
                        assert extra.goaway() == w.ENHANCE_YOUR_CALM
                        extra.wait(lambda s: s.closed, "close")
                        refused += 1
                for peer in held:
                    peer.alive()
            finally:
                for peer in held:
                    peer.close()

        others_are_served(server, attack)
        assert refused > 10


IDLE_S = 3.0  # 10 % of it (300 ms) is far more than a loaded machine delays a timer


def test_idle_connections_are_closed_within_a_tenth_of_the_timeout() -> None:
    """No open stream for the idle timeout: GOAWAY NO_ERROR between 1.0x and 1.1x of it, counted
    from the connection's start or its last call's end (PINGs do not count)."""
    idle_for: dict[str, tuple[float, float]] = {}  # peer: (seconds idle at its GOAWAY, least)
    with running_server(idle_timeout_s=IDLE_S) as server:

        def attack() -> None:
            opened = time.monotonic()
            with attacker(server.port) as silent, attacker(server.port) as pinging, attacker(server.port) as called:  # fmt: skip
                called.send(called.call(1, HEALTH_CHECK_PATH, health_request()))
                called.wait(lambda s: 1 in s.statuses, "the call's end")
                call_ended = time.monotonic()  # the server ended it a little earlier
                while not pinging.seen.closed and time.monotonic() < opened + 2 * IDLE_S:
                    with contextlib.suppress(OSError):
                        pinging.send(frame(w.PING, 0, 0, b"12345678"))
                    time.sleep(0.05)
                for name, peer, since, least in (("silent", silent, opened, 1.0),
                                                 ("pinging", pinging, opened, 1.0),
                                                 ("called", called, call_ended, 0.95)):  # fmt: skip
                    assert peer.goaway() == w.NO_ERROR, name
                    peer.wait(lambda s: s.closed, "close")
                    idle_for[name] = (peer.seen.goaway_at - since, least)

        others_are_served(server, attack)
    print(f"idle timeout {IDLE_S}s: closed after {idle_for}")
    for name, (took, least) in idle_for.items():
        assert least * IDLE_S <= took <= 1.1 * IDLE_S, (name, took)


def test_connections_without_a_preface_are_closed_and_free_the_cap() -> None:
    """Sockets that send nothing, half the preface, or the preface without SETTINGS are closed
    after preface_timeout_s, so they cannot hold the connection cap until the idle timeout;
    a connection that sent its preface stays."""
    cap, preface_s = 8, 1.0
    closed_after: list[float] = []
    limits = {"max_connections": cap, "preface_timeout_s": preface_s, "idle_timeout_s": 60}
    with running_server(**limits) as server:

        def attack() -> None:
            opened = time.monotonic()
            silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(cap - 2)]  # fmt: skip
            try:
                silent[0].sendall(w.PREFACE[:10])
                silent[1].sendall(w.PREFACE)
                with attacker(server.port) as held:  # with the probe's: the cap is reached
                    held.alive()
                    with attacker(server.port) as extra:
                        assert extra.goaway() == w.ENHANCE_YOUR_CALM, "the cap was not reached"
                    for sock in silent:
                        with contextlib.suppress(ConnectionResetError):
                            while sock.recv(65536):
                                pass
                        closed_after.append(time.monotonic() - opened)
                    with attacker(server.port) as late:
                        late.alive()  # room again
                    held.alive()
            finally:
                for sock in silent:
                    sock.close()

        others_are_served(server, attack)
    print(f"preface timeout {preface_s}s: closed after {[round(t, 2) for t in closed_after]}")
    assert all(preface_s <= took < 3 * preface_s for took in closed_after), closed_after


def test_unfinished_messages_over_all_connections_stay_within_the_memory_budget() -> None:
    """8 connections each park ~15 MiB of unfinished messages (120 MiB); the budget is 16 MiB:
    the connection holding most is sent away with ENHANCE_YOUR_CALM, memory stays bounded."""
    budget_mb = 16
    with running_server(memory_budget=budget_mb << 20) as server:
        peers: list[Attacker] = []

        def attack() -> None:
            chunk = bytes(w.DEFAULT_MAX_FRAME)
            try:
                for _ in range(8):
                    peer = Attacker(server.port)
                    peers.append(peer)
                    for stream in range(1, 31, 2):  # 15 streams, ~1 MiB each (within every window)
                        start = grpc_frame(b"")[:1] + (STREAM_WINDOW - 5).to_bytes(4, "big")
                        frames = [peer.headers(stream, OPEN_PATH), frame(w.DATA, 0, stream, start)]
                        frames += [frame(w.DATA, 0, stream, chunk)] * (
                            STREAM_WINDOW // len(chunk) - 2
                        )
                        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                            peer.send(*frames)
                for peer in peers:  # each is sent away, or answers a PING after all its DATA
                    with contextlib.suppress(OSError):
                        peer.send(frame(w.PING, 0, 0, b"12345678"))
                    peer.wait(lambda s: s.goaway is not None or s.ping_acks or s.closed, "an end")
            finally:
                for peer in peers:
                    peer.close()

        others_are_served(server, attack, memory_budget_mb=budget_mb)
        codes = [p.seen.goaway for p in peers]
        assert codes.count(w.ENHANCE_YOUR_CALM) >= 6, codes


# -- 6. a smaller HPACK table on the client's side ------------------------------------------------


def test_a_client_table_smaller_than_4096_gets_a_table_size_update_first() -> None:
    """SETTINGS_HEADER_TABLE_SIZE 0: our first header block starts with a size update to 0 (RFC 7541
    4.2), later ones do not; the client's decoder allows no table at all and decodes all."""
    settings = setting(w.SETTINGS_HEADER_TABLE_SIZE, 0)
    with running_server() as server, attacker(server.port, settings) as peer:
        peer.decoder.max_allowed_table_size = 0

        def attack() -> None:
            peer.wait(lambda s: s.settings_acks > 0, "SETTINGS ACK")
            # Room for every answer: a fast run makes ~10,000 calls, 7 DATA bytes each,
            # which would fill the default 65,535-byte connection window and stall.
            peer.send(window_update(0, 1 << 30))
            stream = 1
            for _ in until(ATTACK_S):
                toggle = setting(w.SETTINGS_HEADER_TABLE_SIZE, 4096 if stream % 4 == 1 else 0)
                peer.send(frame(w.SETTINGS, 0, 0, toggle), peer.call(stream, HEALTH_CHECK_PATH, health_request()))  # fmt: skip
                peer.wait(lambda s, n=stream: n in s.statuses, f"stream {stream}")
                assert peer.seen.statuses[stream] == b"0"
                stream += 2
            peer.alive()

        others_are_served(server, attack)
        assert not peer.seen.decode_error, peer.seen.decode_error
        first, *rest = peer.seen.blocks
        assert first.startswith(w.TABLE_SIZE_ZERO) and first[0] == 0x20
        assert not any(block[0] & 0xE0 == 0x20 for block in rest)


# -- 7. CONTINUATION frames are counted -----------------------------------------------------------


def test_endless_empty_continuation_frames_get_enhance_your_calm() -> None:
    with running_server() as server:

        def attack() -> None:
            for _ in until(ATTACK_S):
                with attacker(server.port) as peer:
                    peer.send(peer.headers(1, OPEN_PATH, flags=0))
                    peer.flood(frame(w.CONTINUATION, 0, 1) * 1000, seconds=0.2, max_bytes=9 << 20)
                    assert peer.goaway() == w.ENHANCE_YOUR_CALM

        others_are_served(server, attack)


# -- 8. the errors RFC 9113 names -------------------------------------------------------------------

Case = Callable[[Attacker], bytes]
# fmt: off
CONNECTION_ERRORS: dict[str, tuple[bytes | None, Case, int]] = {
    # name: (first frame instead of SETTINGS, or None; what follows; GOAWAY code)
    "first frame not SETTINGS": (frame(w.PING, 0, 0, bytes(8)), lambda p: b"", w.PROTOCOL_ERROR),
    "first frame a SETTINGS ACK": (frame(w.SETTINGS, w.ACK, 0), lambda p: b"", w.PROTOCOL_ERROR),
    "PING on a stream": (None, lambda p: frame(w.PING, 0, 1, bytes(8)), w.PROTOCOL_ERROR),
    "SETTINGS ACK with a payload": (None, lambda p: frame(w.SETTINGS, w.ACK, 0, setting(w.SETTINGS_ENABLE_PUSH, 0)), w.FRAME_SIZE_ERROR),
    "SETTINGS of 5 bytes": (None, lambda p: frame(w.SETTINGS, 0, 0, bytes(5)), w.FRAME_SIZE_ERROR),
    "SETTINGS on a stream": (None, lambda p: frame(w.SETTINGS, 0, 1), w.PROTOCOL_ERROR),
    "ENABLE_PUSH 2": (None, lambda p: frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_ENABLE_PUSH, 2)), w.PROTOCOL_ERROR),
    "PRIORITY on stream 0": (None, lambda p: frame(w.PRIORITY, 0, 0, bytes(5)), w.PROTOCOL_ERROR),
    "GOAWAY of 4 bytes": (None, lambda p: frame(w.GOAWAY, 0, 0, bytes(4)), w.FRAME_SIZE_ERROR),
    "GOAWAY on a stream": (None, lambda p: frame(w.GOAWAY, 0, 1, bytes(8)), w.PROTOCOL_ERROR),
}
# fmt: on


def _stream_errors(peer: Attacker, stream: int) -> None:
    """Stream-level errors on one connection: RST_STREAM or a gRPC status, and it serves on."""
    # PRIORITY of the wrong length: FRAME_SIZE_ERROR on that stream.
    peer.send(peer.headers(stream, OPEN_PATH), frame(w.PRIORITY, 0, stream, bytes(4)))
    peer.wait(lambda s: stream in s.resets, "RST_STREAM")
    assert peer.seen.resets[stream] == w.FRAME_SIZE_ERROR
    # END_STREAM inside a message: the call ends with INTERNAL, not OK.
    stream += 2
    peer.send(peer.call(stream, OPEN_PATH, grpc_frame(b"whole") + grpc_frame(b"cut")[:6]))
    peer.wait(lambda s: stream in s.statuses, "trailers")
    assert peer.seen.statuses[stream] == b"13"
    # DATA after END_STREAM (the answer still waits for window, so the stream is known).
    stream += 2
    peer.send(frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_INITIAL_WINDOW_SIZE, 0)))
    peer.send(peer.call(stream, OPEN_PATH, grpc_frame(b"x")), frame(w.DATA, 0, stream, b"late"))
    peer.wait(lambda s: stream in s.resets, "RST_STREAM")
    assert peer.seen.resets[stream] == w.STREAM_CLOSED
    peer.send(frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_INITIAL_WINDOW_SIZE, 65535)))
    # HEADERS after END_STREAM, on the same kind of stream: STREAM_CLOSED too.
    stream += 2
    peer.send(frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_INITIAL_WINDOW_SIZE, 0)))
    peer.send(peer.call(stream, OPEN_PATH, grpc_frame(b"x")), peer.headers(stream, OPEN_PATH, w.END_HEADERS | w.END_STREAM))  # fmt: skip
    peer.wait(lambda s: stream in s.resets, "RST_STREAM")
    assert peer.seen.resets[stream] == w.STREAM_CLOSED
    peer.send(frame(w.SETTINGS, 0, 0, setting(w.SETTINGS_INITIAL_WINDOW_SIZE, 65535)))
    peer.alive()


def test_protocol_violations_get_the_errors_rfc_9113_names() -> None:
    with running_server() as server:

        def attack() -> None:
            for round_ in until(ATTACK_S):
                for name, (first, then, code) in CONNECTION_ERRORS.items():
                    with attacker(server.port, first=first) as peer:
                        peer.send(then(peer))
                        assert peer.goaway() == code, (name, peer.seen.goaway)
                        peer.wait(lambda s: s.closed, "close")
                        assert peer.seen.frames_after_goaway == 0, name
                with attacker(server.port) as peer:
                    _stream_errors(peer, 1)
                if round_ >= 50:
                    break

        others_are_served(server, attack)


# -- fuzz: random frame sequences against one connection, in-process ------------------------------


class FakeTransport:
    """What GrpcConnection writes, and whether it closed or paused reading."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.eof = False
        self.paused = False
        self.writes_after_close = 0

    def write(self, data: bytes) -> None:
        if self.closed or self.eof:
            self.writes_after_close += 1
        self.out += data

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def check_invariants(connection: GrpcConnection, pool: Pool) -> None:
    c = connection
    assert pool.held == sum(x._held for x in pool.connections) >= 0
    if c._dead:
        assert c._held == 0 and not c._streams
        return
    assert c._held == sum(len(s.data) for s in c._streams.values())
    assert c._recv_window + c._unacked + c._held == CONNECTION_WINDOW
    assert 0 <= c._recv_window <= CONNECTION_WINDOW
    assert len(c._streams) <= MAX_STREAMS
    for stream_id, s in c._streams.items():
        if not s.closed:
            assert s.recv_window + s.unacked + len(s.data) == STREAM_WINDOW, stream_id
        in_queues = (stream_id in c._wait_stream) + (stream_id in c._wait_connection)
        assert in_queues == s.waiting, stream_id
        if s.waiting:
            assert s.outbox and s.outbox[0][0], "only an answer waiting for window waits"
        assert c._peer_window + s.send_credit <= w.MAX_WINDOW
    assert set(c._wait_stream) | set(c._wait_connection) <= set(c._streams)
    assert len(c._decoder._paths) <= w.MAX_CACHED_BLOCKS


def parse_frames(out: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, at = [], 0
    while at < len(out):
        assert len(out) - at >= 9, "a partial frame written"
        size = int.from_bytes(out[at : at + 3], "big")
        assert len(out) - at >= 9 + size, "a partial frame written"
        frames.append((out[at + 3], out[at + 4], int.from_bytes(out[at + 5 : at + 9], "big"), out[at + 9 : at + 9 + size]))  # fmt: skip
        at += 9 + size
    return frames


_encoder_fields = st.sampled_from([OPEN_PATH, BOOM_PATH, HEALTH_CHECK_PATH, b"/x", b"/\xff"])
_kinds = st.sampled_from([w.DATA, w.HEADERS, w.PRIORITY, w.RST_STREAM, w.SETTINGS, w.PUSH_PROMISE,
                          w.PING, w.GOAWAY, w.WINDOW_UPDATE, w.CONTINUATION, 0x0A])  # fmt: skip
_streams = st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1])


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[bytes]:
    encoder = hpack.Encoder()
    frames = [w.PREFACE] if draw(st.integers(0, 9)) else [draw(st.binary(max_size=30))]
    if draw(st.integers(0, 9)):
        pairs = draw(st.lists(st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 9]), st.integers(0, 2**32 - 1)), max_size=3))  # fmt: skip
        frames.append(frame(w.SETTINGS, 0, 0, b"".join(setting(k, v) for k, v in pairs)))
    for _ in range(draw(st.integers(0, 25))):
        kind, flags, stream = draw(_kinds), draw(st.integers(0, 255)), draw(_streams)
        shape = draw(st.integers(0, 3))
        if kind in (w.HEADERS, w.CONTINUATION) and shape:
            payload = encoder.encode(request_fields(draw(_encoder_fields)), huffman=draw(st.booleans()))  # fmt: skip
            if kind == w.HEADERS:
                flags &= ~(w.PADDED | w.PRIORITY_FLAG)
        elif kind == w.DATA and shape:
            flags &= ~w.PADDED
            payload = draw(st.sampled_from([grpc_frame(b"hello"), health_request(), grpc_frame(b"x")[:3], b"\x01\x00\x00\x00\x01z", b"\x00\x7f\xff\xff\xff"]))  # fmt: skip
        elif kind == w.WINDOW_UPDATE and shape:
            payload = draw(st.sampled_from([0, 1, 100, 65535, 2**31 - 1])).to_bytes(4, "big")
        elif kind == w.SETTINGS and shape:
            payload = setting(draw(st.sampled_from([1, 2, 4, 5])), draw(st.sampled_from([0, 1, 2, 4096, 16384, 2**31 - 1])))  # fmt: skip
        else:
            payload = draw(st.binary(max_size=40))
        frames.append(frame(kind, flags, stream, payload))
    return frames


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=frame_sequences(), cuts=st.lists(st.integers(1, 64), max_size=8), budget=st.sampled_from([3, 50, 512]))  # fmt: skip
def test_fuzz_no_exception_escapes_and_invariants_hold(frames: list[bytes], cuts: list[int], budget: int) -> None:  # fmt: skip
    errors = _Errors()
    logger = logging.getLogger("extproc")
    logger.addHandler(errors)
    try:
        asyncio.run(_drive(frames, cuts, budget))
    finally:
        logger.removeHandler(errors)
    # A handler's bug is logged (the Boom method); any other error log is a bug of the server's.
    assert [r.getMessage() for r in errors.records if r.getMessage() != "a handler failed"] == []


async def _drive(frames: list[bytes], cuts: list[int], budget: int) -> None:
    def boom(message: bytes) -> tuple[bytes | None, int | None, str]:
        raise RuntimeError("a handler bug")

    methods = {OPEN_PATH: lambda m: (m, None, ""), BOOM_PATH: boom, HEALTH_CHECK_PATH: lambda m: (b"", 0, "")}  # fmt: skip
    pool = Pool(methods, Limits(work_per_turn=budget, memory_budget=1 << 16))
    connection = GrpcConnection(pool)
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    data = b"".join(frames)
    at = 0
    for cut in [*cuts, len(data)]:
        connection.data_received(data[at : at + cut])
        at += cut
        check_invariants(connection, pool)
        for _ in range(50):  # the turns left for later
            await asyncio.sleep(0)
        check_invariants(connection, pool)
        if at >= len(data):
            break
    sent = parse_frames(bytes(transport.out))
    goaways = [i for i, f in enumerate(sent) if f[0] == w.GOAWAY]
    if goaways:
        assert goaways[-1] == len(sent) - 1, "nothing after our last GOAWAY"
        assert (
            transport.closed
            or transport.eof
            or int.from_bytes(sent[goaways[0]][3][4:8], "big") == w.NO_ERROR
        )
    assert transport.writes_after_close == 0
    connection.connection_lost(None)
    assert pool.held == 0 and not pool.connections
