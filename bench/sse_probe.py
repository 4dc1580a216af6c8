"""SSE through the gateway: time to first byte, per-event lag, and many streams held open.

The client is raw asyncio over HTTP/1.1, so the times are the network path's
and not an HTTP library's. Each sample opens its own connection first and
starts the clock when the request is written. Each event from the benchmark's
upstream carries the ``time.monotonic()`` it was written at; an event's lag is
when the client read it minus that (both on the machine's one monotonic clock).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

_HOST = "127.0.0.1"
_SENT = re.compile(rb'"t":([0-9.]+)\}')  # the upstream's write time, ending an event's data


@dataclass(frozen=True)
class Timing:
    first_byte_ms: float  # response headers arrive
    first_event_ms: float  # the first event's bytes arrive
    event_lag_ms: tuple[float, ...]  # per event: client read time minus upstream write time


class _Lags:
    """Collects the lag of every event found in the bytes read so far."""

    def __init__(self) -> None:
        self.received = b""
        self.lags: list[float] = []
        self._searched = 0

    def read(self, chunk: bytes, now: float) -> None:
        self.received += chunk
        for found in _SENT.finditer(self.received, self._searched):
            self.lags.append((now - float(found[1])) * 1000)
            self._searched = found.end()


def _request(path: str, headers: dict[str, str], close: bool) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "host: bench", "accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_first_event(
    reader: asyncio.StreamReader, started: float
) -> tuple[float, float, bytes]:
    """Read until the first ``data:`` line; returns both times and the bytes read."""
    received = b""
    first_byte = 0.0
    while b"data:" not in received:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError(f"stream ended before the first event: {received[:200]!r}")
        if not received:
            first_byte = time.perf_counter() - started
        received += chunk
    if not received.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer: {received[:200]!r}")
    return first_byte, time.perf_counter() - started, received


async def time_one(port: int, path: str, headers: dict[str, str]) -> Timing:
    """One SSE request on a fresh connection, read to its end."""
    reader, writer = await asyncio.open_connection(_HOST, port)
    try:
        started = time.perf_counter()
        writer.write(_request(path, headers, close=True))
        first_byte, first_event, received = await _read_first_event(reader, started)
        lags = _Lags()
        lags.read(received, time.monotonic())
        while chunk := await reader.read(65536):  # to the end: the next sample starts clean
            lags.read(chunk, time.monotonic())
        return Timing(first_byte * 1000, first_event * 1000, tuple(lags.lags))
    finally:
        writer.close()


async def ttfb(
    targets: dict[str, tuple[int, dict[str, str]]], path: str, samples: int
) -> dict[str, dict[str, float]]:
    """Median times per target; the targets take turns so drift hits all alike.

    ``event_lag_ms`` is the median over every event of every sample.
    """
    timings: dict[str, list[Timing]] = {name: [] for name in targets}
    for _ in range(samples):
        for name, (port, headers) in targets.items():
            timings[name].append(await time_one(port, path, headers))
    return {
        name: {
            "first_byte_ms": statistics.median(t.first_byte_ms for t in found),
            "first_event_ms": statistics.median(t.first_event_ms for t in found),
            "event_lag_ms": statistics.median(lag for t in found for lag in t.event_lag_ms),
        }
        for name, found in timings.items()
    }


class _Opened:
    """Counts streams that have their first event; set once all ``expected`` have."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.all = asyncio.Event()

    def one(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.all.set()


async def _hold(
    port: int, path: str, gate: asyncio.Semaphore, opened: _Opened, release: asyncio.Event
) -> None:
    """Open one stream (at most ``gate`` at a time), then keep it open until ``release``."""
    writer = None
    try:
        async with gate:
            reader, writer = await asyncio.open_connection(_HOST, port)
            writer.write(_request(path, {}, close=True))
            await _read_first_event(reader, time.perf_counter())
        opened.one()
        await release.wait()
    finally:
        if writer is not None:
            writer.close()


async def hold_streams(
    port: int,
    path: str,
    count: int,
    measure: Callable[[], Awaitable[dict[str, float]]],
    deadline_s: float = 120.0,
) -> dict[str, float]:
    """Open ``count`` streams, wait until each has its first event, then ``measure()``."""
    opened = _Opened(count)
    release = asyncio.Event()
    gate = asyncio.Semaphore(100)  # open in waves: no SYN flood against one listener
    tasks = {asyncio.create_task(_hold(port, path, gate, opened, release)) for _ in range(count)}
    waiter = asyncio.create_task(opened.all.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, *tasks}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            failed = next((task for task in done if task.exception()), None)
            if failed is not None:
                raise RuntimeError(f"an SSE stream failed: {failed.exception()!r}")
            raise TimeoutError(f"only {opened.count}/{count} streams opened in {deadline_s}s")
        return await measure()
    finally:
        release.set()
        waiter.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
