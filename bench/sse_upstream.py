"""A tiny Server-Sent Events upstream: response headers at once, then events with pauses.

``GET /anything?events=N&pause_ms=M`` answers ``200 text/event-stream`` right
away and then sends N events, each after a pause of M ms, like an LLM
streaming tokens. The events are shaped like Anthropic's Messages stream
(``message_start`` with usage, text deltas, ``message_delta`` with the output
tokens), so a metering gateway parses what it would parse in production, and
each carries ``"t"``: ``time.monotonic()`` when it was written (one clock for
every process on the machine), so a client can tell how late each arrives.
``GET /stats`` tells how many streams are open now (so the benchmark can
prove its 1,000 streams really reached the upstream) and how many events
were sent in all.

Run: ``python bench/sse_upstream.py --port PORT`` (HTTP/1.1, keep-alive, chunked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

_HEADERS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class Upstream:
    def __init__(self) -> None:
        self.open_streams = 0
        self.served = 0
        self.events = 0  # sent, all streams

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode("latin-1")
                url = urlsplit(target)
                if url.path.endswith("/stats"):
                    await self._stats(writer)
                else:
                    query = parse_qs(url.query)
                    events = int(query.get("events", ["3"])[0])
                    pause = int(query.get("pause_ms", ["10"])[0]) / 1000
                    await self._stream(writer, events, pause)
                if b"connection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away: that ends its stream
        finally:
            writer.close()

    async def _stats(self, writer: asyncio.StreamWriter) -> None:
        counts = {"open_streams": self.open_streams, "served": self.served, "events": self.events}
        body = json.dumps(counts).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, events: int, pause: float) -> None:
        self.open_streams += 1
        try:
            writer.write(_HEADERS)
            await writer.drain()
            for number in range(events):
                await asyncio.sleep(pause)
                event = _event(number, events)
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                self.events += 1
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.served += 1
        finally:
            self.open_streams -= 1


_START = (
    '{"type":"message_start","message":{"model":"claude-bench-1",'
    '"usage":{"input_tokens":12,"output_tokens":1}},'
)
_DELTA = '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"word "},'
_END = '{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":%d},'


def _event(number: int, events: int) -> bytes:
    """Event ``number`` of ``events``: start, text deltas, and the final usage."""
    if number == 0:
        name, data = "message_start", _START
    elif number == events - 1:
        name, data = "message_delta", _END % events
    else:
        name, data = "content_block_delta", _DELTA
    return f'event: {name}\ndata: {data}"t":{time.monotonic()!r}}}\n\n'.encode()


async def serve(port: int) -> None:
    upstream = Upstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
