"""A small asyncio HTTP/2 server for gRPC calls answered at once, message by message.

Why not grpcio: its per-stream machinery (completion queues, thread hand-offs,
call objects) costs ~380 µs of CPU per ext_proc stream here, while the work
itself is a few µs. Every call this server handles is answered synchronously
as its message arrives (no awaiting, no threads), so a stream is a handful of
frames parsed and three precomputed frames written in one ``write``.

It implements what a gRPC peer such as Envoy relies on: the connection
preface and SETTINGS, flow control in both directions, PING, RST_STREAM,
GOAWAY (both ways, graceful on shutdown), CONTINUATION, padding, message
framing across DATA frames, trailers-only error answers, and the gRPC error
statuses for unknown methods, compressed or oversized messages.

What a peer can make it hold is bounded: a header block, the streams open at
once (more are refused), a message, the bytes received but not yet handed to a
handler (the receive windows, reopened only as messages are handed on; a peer
that fills the connection's window this way is sent away), the answers waiting
for the peer's window (such a stream reads no further message until they are
sent) and the write buffer (reading pauses while the peer does not read).
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from extproc.server import h2wire as w

# (answer message or None, grpc status to end the call with or None to keep it open, error text)
Reply = tuple[bytes | None, int | None, str]
Method = Callable[[bytes], Reply]

UNIMPLEMENTED, RESOURCE_EXHAUSTED = 12, 8
STREAM_WINDOW = 1 << 20  # bytes a stream may send that we have not handed to its handler yet
MAX_MESSAGE = STREAM_WINDOW - 5  # a whole message and its 5-byte prefix fit in a stream window
CONNECTION_WINDOW = 16 << 20  # the same, over all the connection's streams
MAX_HEADER_BLOCK = 64 << 10  # Envoy's headers on its ext_proc calls are a few hundred bytes
MAX_STREAMS = 1000
_SETTING = struct.Struct(">HL")


@dataclass(slots=True)
class _Stream:
    method: Method | None
    send_window: int  # what we may still send on it (the peer's window)
    recv_window: int = STREAM_WINDOW  # what the peer may still send on it
    data: bytearray = field(default_factory=bytearray)  # received, not yet handed on
    unacked: int = 0  # bytes handed on since our last stream WINDOW_UPDATE
    started: bool = False  # response headers sent
    closed: bool = False  # trailers sent (or queued)
    peer_ended: bool = False  # the client sent END_STREAM
    outbox: deque[tuple[bool, bytes]] = field(default_factory=deque)  # (is DATA payload, bytes)


class GrpcConnection(asyncio.Protocol):
    """One client connection; ``methods`` maps a gRPC path to its handler."""

    def __init__(self, methods: Mapping[bytes, Method], connections: set[GrpcConnection]) -> None:
        self._methods = methods
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface_seen = False
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._decoder = w.HeaderDecoder()
        self._continuation: tuple[int, bytearray, int] | None = None
        self._send_window = w.DEFAULT_WINDOW
        self._peer_window = w.DEFAULT_WINDOW
        self._peer_max_frame = w.DEFAULT_MAX_FRAME
        self._recv_window = CONNECTION_WINDOW
        self._unacked = 0  # bytes handed on (or dropped) since our last connection WINDOW_UPDATE
        self._out: list[bytes] = []
        self._draining = False

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._connections.add(self)
        ours = {
            w.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            w.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        }
        self._transport.write(
            w.settings(ours) + w.window_update(0, CONNECTION_WINDOW - w.DEFAULT_WINDOW)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._streams.clear()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._consume()
        except w.ProtocolViolation as exc:
            self._out.append(w.goaway(self._last_stream, exc.code))
            self._flush_out()
            assert self._transport is not None
            self._transport.close()
            return
        self._flush_out()
        if self._draining and not self._streams:
            self.close()

    def pause_writing(self) -> None:
        """The peer reads slower than we answer: stop reading what would make more answers."""
        assert self._transport is not None
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        assert self._transport is not None
        self._transport.resume_reading()

    # -- shutdown ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Ask the peer to open no new streams; the ones it already sent are still served."""
        self._draining = True
        if self._transport is not None:
            self._transport.write(w.goaway(w.MAX_WINDOW, w.NO_ERROR))
            if not self._streams:
                self.close()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(w.goaway(self._last_stream, w.NO_ERROR))
            self._transport.close()

    # -- frames in ---------------------------------------------------------------------------

    def _consume(self) -> None:
        buffer = self._buffer
        offset = 0
        if not self._preface_seen:
            if len(buffer) < len(w.PREFACE):
                return
            if buffer[: len(w.PREFACE)] != w.PREFACE:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._preface_seen, offset = True, len(w.PREFACE)
        while len(buffer) - offset >= w.FRAME_HEADER:
            length, kind, flags, stream_id = w.parse_head(buffer, offset)
            if length > w.DEFAULT_MAX_FRAME:
                raise w.ProtocolViolation(
                    w.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE"
                )
            start = offset + w.FRAME_HEADER
            end = start + length
            if len(buffer) < end:
                break
            self._on_frame(kind, flags, stream_id, bytes(buffer[start:end]))
            offset = end
        del buffer[:offset]

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != w.CONTINUATION:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "header block interrupted")
        if kind == w.DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == w.HEADERS:
            self._on_headers_frame(flags, stream_id, payload)
        elif kind == w.CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif kind == w.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == w.SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == w.PING:
            if len(payload) != 8:
                raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
            if not flags & w.ACK:
                self._out.append(w.frame(w.PING, w.ACK, 0, payload))
        elif kind == w.RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif kind == w.GOAWAY:
            self._draining = True
        elif kind == w.PUSH_PROMISE:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "clients must not push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _on_headers_frame(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "HEADERS on an invalid stream id")
        fragment = w.unpad(flags, payload, priority_possible=True)
        if flags & w.END_HEADERS:
            self._on_headers(stream_id, fragment, bool(flags & w.END_STREAM))
        else:
            self._continuation = (stream_id, bytearray(fragment), flags)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "unexpected CONTINUATION")
        _, block, first_flags = self._continuation
        if len(block) + len(payload) > MAX_HEADER_BLOCK:
            raise w.ProtocolViolation(w.ENHANCE_YOUR_CALM, "header block too large")
        block += payload
        if flags & w.END_HEADERS:
            self._continuation = None
            self._on_headers(stream_id, bytes(block), bool(first_flags & w.END_STREAM))

    def _on_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        path = self._decoder.path(block)  # always decode: keeps the HPACK table in step
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id <= self._last_stream:
                if end_stream:
                    return  # trailers of a call we already ended
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "stream opened out of order")
            self._last_stream = stream_id
            if len(self._streams) >= MAX_STREAMS:
                self._out.append(w.rst_stream(stream_id, w.REFUSED_STREAM))
                return
            stream = self._open(stream_id, path)
        if end_stream:
            stream.peer_ended = True
            self._pump(stream_id, stream)

    def _open(self, stream_id: int, path: bytes) -> _Stream:
        stream = _Stream(self._methods.get(path), self._peer_window)
        self._streams[stream_id] = stream
        if stream.method is None:
            text = f"unknown method {path.decode(errors='replace')}"
            self._finish(stream_id, stream, UNIMPLEMENTED, text)
        return stream

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "DATA on stream 0")
        if len(payload) > self._recv_window:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_window -= len(payload)
        stream = self._streams.get(stream_id)
        if stream is None or stream.closed:
            if stream_id > self._last_stream:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "DATA on an idle stream")
            self._unacked += len(payload)  # a call already ended: dropped, but counted
        else:
            self._on_call_data(flags, stream_id, stream, payload)
        self._give_back(stream_id, stream)
        if self._recv_window == 0:  # all held by messages we cannot hand on: a stall for good
            raise w.ProtocolViolation(
                w.ENHANCE_YOUR_CALM, "the connection window is full of bytes we cannot hand on"
            )

    def _on_call_data(self, flags: int, stream_id: int, stream: _Stream, payload: bytes) -> None:
        if len(payload) > stream.recv_window:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        stream.recv_window -= len(payload)
        content = w.unpad(flags, payload, priority_possible=False)
        padding = len(payload) - len(content)
        self._unacked += padding
        stream.unacked += padding
        stream.data += content
        if flags & w.END_STREAM:
            stream.peer_ended = True
        self._pump(stream_id, stream)

    def _pump(self, stream_id: int, stream: _Stream) -> None:
        """Hand on the stream's complete messages; end the call once the client ended it."""
        self._on_messages(stream_id, stream)
        if stream.peer_ended and not stream.outbox:
            self._finish(stream_id, stream, 0, "")  # the client ended the call: end ours too

    def _on_messages(self, stream_id: int, stream: _Stream) -> None:
        data = stream.data
        while len(data) >= 5 and not stream.closed and not stream.outbox:
            size = int.from_bytes(data[1:5], "big")
            if size > MAX_MESSAGE:
                self._finish(stream_id, stream, RESOURCE_EXHAUSTED, "message too large")
                return
            if len(data) < 5 + size:
                return
            compressed, message = data[0], bytes(data[5 : 5 + size])
            del data[: 5 + size]
            self._unacked += 5 + size
            stream.unacked += 5 + size
            if compressed:
                self._finish(
                    stream_id, stream, UNIMPLEMENTED, "compressed messages are not supported"
                )
                return
            assert stream.method is not None
            answer, status, text = stream.method(message)
            if answer is not None:
                self._send_message(stream_id, stream, answer)
            if status is not None:
                self._finish(stream_id, stream, status, text)

    def _give_back(self, stream_id: int, stream: _Stream | None) -> None:
        """Reopen the receive windows by the bytes handed on, once half a window is in use."""
        if self._unacked and self._recv_window < CONNECTION_WINDOW // 2:
            self._out.append(w.window_update(0, self._unacked))
            self._recv_window += self._unacked
            self._unacked = 0
        if (
            stream is not None
            and stream.unacked
            and not stream.closed
            and stream.recv_window < STREAM_WINDOW // 2
        ):
            self._out.append(w.window_update(stream_id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if flags & w.ACK:
            return
        if stream_id != 0 or len(payload) % 6:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "malformed SETTINGS")
        for key, value in _SETTING.iter_unpack(payload):
            if key == w.SETTINGS_INITIAL_WINDOW_SIZE:
                self._set_peer_window(value)
            elif key == w.SETTINGS_MAX_FRAME_SIZE:
                if not w.DEFAULT_MAX_FRAME <= value <= w.MAX_FRAME_LIMIT:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self._peer_max_frame = value
        self._out.append(w.frame(w.SETTINGS, w.ACK, 0))
        self._flush_streams()

    def _set_peer_window(self, value: int) -> None:
        """A new SETTINGS_INITIAL_WINDOW_SIZE moves every open stream's window by the change."""
        if value > w.MAX_WINDOW:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "initial window too large")
        for stream in self._streams.values():
            stream.send_window += value - self._peer_window
            if stream.send_window > w.MAX_WINDOW:
                raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "a stream window overflows")
        self._peer_window = value

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload must be 4 bytes")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            self._grow_connection_window(increment)
        elif (stream := self._streams.get(stream_id)) is not None:
            self._grow_stream_window(stream_id, stream, increment)
        elif stream_id > self._last_stream:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")

    def _grow_connection_window(self, increment: int) -> None:
        if increment == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "connection window update of 0")
        if self._send_window + increment > w.MAX_WINDOW:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "connection window overflows")
        self._send_window += increment
        self._flush_streams()

    def _grow_stream_window(self, stream_id: int, stream: _Stream, increment: int) -> None:
        """Bad updates are stream errors (RFC 9113 6.9): only that stream is reset."""
        if increment == 0:
            self._reset(stream_id, stream, w.PROTOCOL_ERROR)
        elif stream.send_window + increment > w.MAX_WINDOW:
            self._reset(stream_id, stream, w.FLOW_CONTROL_ERROR)
        else:
            stream.send_window += increment
            self._resume(stream_id, stream)

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "RST_STREAM payload must be 4 bytes")
        if stream_id == 0 or stream_id > self._last_stream:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "RST_STREAM on stream 0 or an idle one")
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._drop_data(stream)

    # -- frames out --------------------------------------------------------------------------

    def _send_message(self, stream_id: int, stream: _Stream, message: bytes) -> None:
        if not stream.started:
            stream.outbox.append(
                (False, w.frame(w.HEADERS, w.END_HEADERS, stream_id, w.RESPONSE_HEADERS))
            )
            stream.started = True
        stream.outbox.append((True, b"\x00" + len(message).to_bytes(4, "big") + message))
        self._flush_stream(stream_id, stream)

    def _finish(self, stream_id: int, stream: _Stream, status: int, text: str) -> None:
        """End the call with ``status`` (trailers, or trailers-only if nothing was sent)."""
        if not stream.closed:
            stream.closed = True
            self._drop_data(stream)
            block = w.OK_TRAILERS if status == 0 and not text else w.trailers(status, text)
            if not stream.started:
                block = w.RESPONSE_HEADERS + block
            flags = w.END_HEADERS | w.END_STREAM
            stream.outbox.append((False, w.frame(w.HEADERS, flags, stream_id, block)))
        self._flush_stream(stream_id, stream)

    def _reset(self, stream_id: int, stream: _Stream, code: int) -> None:
        """A stream error (RFC 9113 5.4.2): RST_STREAM, and forget the stream."""
        self._out.append(w.rst_stream(stream_id, code))
        del self._streams[stream_id]
        self._drop_data(stream)

    def _drop_data(self, stream: _Stream) -> None:
        """Bytes of a call that is over will never be handed on: reopen the window for them."""
        self._unacked += len(stream.data)
        stream.data.clear()
        self._give_back(0, None)

    def _flush_stream(self, stream_id: int, stream: _Stream) -> None:
        """Move what flow control allows from the stream's outbox to the write buffer."""
        outbox = stream.outbox
        while outbox:
            is_data, chunk = outbox[0]
            if is_data:
                allowed = min(self._send_window, stream.send_window, self._peer_max_frame)
                if allowed <= 0:
                    return
                piece, rest = chunk[:allowed], chunk[allowed:]
                self._out.append(w.frame(w.DATA, 0, stream_id, piece))
                self._send_window -= len(piece)
                stream.send_window -= len(piece)
                if rest:
                    outbox[0] = (True, rest)
                    continue
            else:
                self._out.append(chunk)
            outbox.popleft()
        if stream.closed:
            self._streams.pop(stream_id, None)

    def _flush_streams(self) -> None:
        for stream_id, stream in list(self._streams.items()):
            if stream.outbox:
                self._resume(stream_id, stream)

    def _resume(self, stream_id: int, stream: _Stream) -> None:
        """Send what the windows now allow; once all is sent, the stream reads on."""
        self._flush_stream(stream_id, stream)
        if not stream.outbox and not stream.closed:
            self._pump(stream_id, stream)
            self._give_back(stream_id, stream)

    def _flush_out(self) -> None:
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._out.clear()


class GrpcServer:
    """Listens on one address; ``stop`` drains every connection gracefully."""

    def __init__(self, methods: Mapping[bytes, Method]) -> None:
        self._methods = methods
        self._connections: set[GrpcConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: GrpcConnection(self._methods, self._connections),
            host,
            port,
            reuse_port=reuse_port or None,
            reuse_address=True,
        )

    async def start_unix(self, path: Path) -> None:
        """Listen on a Unix socket (``path`` must not be in use: see ``unixsocket.prepare``)."""
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: GrpcConnection(self._methods, self._connections), str(path)
        )

    @property
    def port(self) -> int:
        """The port listened on (useful when started on port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, GOAWAY every connection, wait up to ``grace_s`` for them to end."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.drain()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self._connections):
            connection.close()
