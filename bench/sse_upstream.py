"""A tiny Server-Sent Events upstream: response headers at once, then events with pauses.

``GET /anything?events=N&pause_ms=M`` answers ``200 text/event-stream`` right
away and then sends N events, each after a pause of M ms, like an LLM
streaming tokens. ``GET /stats`` tells how many streams are open now, so the
benchmark can prove its 1,000 streams really reached the upstream.

Run: ``python bench/sse_upstream.py --port PORT`` (HTTP/1.1, keep-alive, chunked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from urllib.parse import parse_qs, urlsplit

_HEADERS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class Upstream:
    def __init__(self) -> None:
        self.open_streams = 0
        self.served = 0

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
        body = json.dumps({"open_streams": self.open_streams, "served": self.served}).encode()
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
                event = b'event: message\ndata: {"n": %d}\n\n' % number
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.served += 1
        finally:
            self.open_streams -= 1


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
