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

Any local process may connect, so what one peer can make it do is bounded:

- work: each turn of the event loop handles at most ``work_per_turn`` units
  of a connection's frames (a frame, 256 bytes of payload, 16 bytes of header
  block, a handler call); the rest waits, with reading paused, for the next
  turn, so one flooding connection cannot starve the others. No frame walks
  all streams: streams whose answers wait for window are kept in two queues
  (waiting for their own window, waiting for the connection's).
- memory: a header block (bytes, frames and fields), the streams open at once
  (more are refused), a message, the bytes received but not yet handed to a
  handler (the receive windows, reopened only as messages are handed on), the
  answers waiting for the peer's window (such a stream reads no further
  message until they are sent), the write buffer (reading pauses while the
  peer does not read), and over all connections ``memory_budget`` bytes of
  unfinished messages (past it, the connection holding most is sent away).
- connections: at most ``max_connections``; one that has not sent its preface
  and SETTINGS within ``preface_timeout_s``, or has had no open stream for
  ``idle_timeout_s`` (measured from its last stream's end, one timer per
  connection), is closed with GOAWAY.

Every exception, from a malformed frame or from a handler, becomes an error on
the wire in one place (``_fail``): GOAWAY for the connection, RST_STREAM for a
stream, gRPC INTERNAL for a call whose handler failed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, cast

from extproc.server import h2wire as w

log = logging.getLogger("extproc")

# (answer message or None, grpc status to end the call with or None to keep it open, error text)
Reply = tuple[bytes | None, int | None, str]
Method = Callable[[bytes], Reply]


class Call(NamedTuple):
    """What an opener gives for one call: its handler and hooks.

    ``on_message`` answers each message (a bidi or server-streaming call).
    ``on_end`` runs once the call is over however it ends (finished, reset,
    connection lost). ``on_client_end`` makes it a client-streaming call: once the
    client has ended its side, its reply (one answer, and a status, None for OK)
    ends the call; without it the call ends OK with nothing more.
    """

    on_message: Method
    on_end: Callable[[], None] | None = None
    on_client_end: Callable[[], Reply] | None = None


# A method with state per call: called when the call opens, it gives the call's handlers.
Opener = Callable[[], Call]

UNIMPLEMENTED, RESOURCE_EXHAUSTED, INTERNAL = 12, 8, 13
STREAM_WINDOW = 1 << 20  # bytes a stream may send that we have not handed to its handler yet
MAX_MESSAGE = STREAM_WINDOW - 5  # a whole message and its 5-byte prefix fit in a stream window
CONNECTION_WINDOW = 16 << 20  # the same, over all the connection's streams
MAX_HEADER_BLOCK = 64 << 10  # Envoy's headers on its ext_proc calls are a few hundred bytes
MAX_HEADER_FRAMES = 16  # HEADERS + CONTINUATION frames of one header block (64 KiB needs 4)
MAX_STREAMS = 1000
# Limits over a whole server (``Limits``' defaults):
MAX_CONNECTIONS = 128  # Envoy opens one or two per worker thread
IDLE_TIMEOUT_S = 300.0  # a connection with no open stream this long is closed (GOAWAY NO_ERROR)
PREFACE_TIMEOUT_S = 5.0  # a connection without its preface and SETTINGS by then is closed
MEMORY_BUDGET = 64 << 20  # bytes of unfinished messages held over all connections
WORK_PER_TURN = 512  # units of work on one connection per event-loop turn (about 1-3 ms)
HANDLER_WORK = 2  # units a handler call counts for, besides its frames
LINGER_S = 1.0  # after our last GOAWAY, unread bytes are drained this long before closing
_SETTING = struct.Struct(">HL")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one server lets all its peers together make it hold or do."""

    max_connections: int = MAX_CONNECTIONS
    idle_timeout_s: float = IDLE_TIMEOUT_S
    preface_timeout_s: float = PREFACE_TIMEOUT_S
    memory_budget: int = MEMORY_BUDGET
    work_per_turn: int = WORK_PER_TURN


class Pool:
    """What the connections of one server share: methods, limits, and who holds what."""

    def __init__(
        self,
        methods: Mapping[bytes, Method],
        limits: Limits,
        openers: Mapping[bytes, Opener] | None = None,
    ) -> None:
        self.methods = methods
        self.openers = openers or {}
        self.limits = limits
        self.connections: set[GrpcConnection] = set()
        self.held = 0  # bytes of unfinished messages over all connections
        self.refused = 0  # connections refused at the cap


@dataclass(slots=True)
class _Stream:
    method: Method | None
    on_end: Callable[[], None] | None = None  # an opener's, run once when the call is over
    on_client_end: Callable[[], Reply] | None = None  # a client-streaming call's last answer
    send_credit: int = 0  # its send window is the peer's initial window + this
    recv_window: int = STREAM_WINDOW  # what the peer may still send on it
    data: bytearray = field(default_factory=bytearray)  # received, not yet handed on
    unacked: int = 0  # bytes handed on since our last stream WINDOW_UPDATE
    started: bool = False  # response headers sent
    closed: bool = False  # trailers sent (or queued)
    peer_ended: bool = False  # the client sent END_STREAM
    waiting: bool = False  # in one of the connection's queues of streams waiting for window
    outbox: deque[tuple[bool, bytes]] = field(default_factory=deque)  # (is DATA payload, bytes)


class GrpcConnection(asyncio.Protocol):
    """One client connection of the ``pool``'s server."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._methods = pool.methods
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = bytearray()
        self._preface_seen = False
        self._settings_seen = False
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._decoder = w.HeaderDecoder()
        self._continuation: tuple[int, bytearray, int, int] | None = (
            None  # id, block, flags, frames
        )
        self._send_window = w.DEFAULT_WINDOW
        self._peer_window = w.DEFAULT_WINDOW
        self._max_credit = 0  # no stream's send_credit is above this
        self._peer_max_frame = w.DEFAULT_MAX_FRAME
        self._recv_window = CONNECTION_WINDOW
        self._unacked = 0  # bytes handed on (or dropped) since our last connection WINDOW_UPDATE
        self._held = 0  # bytes of unfinished messages in this connection's streams
        # Streams whose answers wait: for their own window / for the connection's (ordered sets).
        self._wait_stream: dict[int, None] = {}
        self._wait_connection: dict[int, None] = {}
        self._table_update = False  # start our next header block with a table size update
        self._table_zeroed = False
        self._out: list[bytes] = []
        self._draining = False
        self._dead = False  # sent away or lost: nothing more is read or written
        self._budget = 0  # work units left in this turn
        self._next_turn: asyncio.Handle | None = None
        self._write_blocked = False
        self._reading_paused = False
        self._idle_since = 0.0  # loop time the last stream ended (or the connection was made)
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()
        pool, limits = self._pool, self._pool.limits
        ours = {
            w.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            w.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        }
        if len(pool.connections) >= limits.max_connections:
            pool.refused += 1
            if pool.refused & (pool.refused - 1) == 0:  # 1st, 2nd, 4th, 8th, ...: not a flood
                log.warning("refused %d connections: %d open", pool.refused, limits.max_connections)
            self._dead = True
            self._transport.write(w.settings(ours) + w.goaway(0, w.ENHANCE_YOUR_CALM))
            self._linger()
            return
        pool.connections.add(self)
        self._transport.write(
            w.settings(ours) + w.window_update(0, CONNECTION_WINDOW - w.DEFAULT_WINDOW)
        )
        self._idle_since = self._loop.time()
        first_check = min(limits.preface_timeout_s, limits.idle_timeout_s)
        self._idle_timer = self._loop.call_later(first_check, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget_all()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        self._buffer += data
        if self._next_turn is None:
            self._turn()

    def pause_writing(self) -> None:
        """The peer reads slower than we answer: stop reading what would make more answers."""
        self._write_blocked = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_reading()

    # -- shutdown ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Ask the peer to open no new streams; the ones it already sent are still served."""
        self._draining = True
        if self._transport is not None and not self._dead:
            self._transport.write(w.goaway(w.MAX_WINDOW, w.NO_ERROR))
            if not self._streams:
                self.close()

    def close(self, linger: bool = False) -> None:
        """GOAWAY NO_ERROR, and close (once the peer has read it, if ``linger``)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(w.goaway(self._last_stream, w.NO_ERROR))
            if linger:
                self._linger()
            else:
                self._transport.close()
        self._forget_all()

    def _linger(self) -> None:
        """Close so that the peer reads our last frames: half-close now, discard what still
        arrives, close LINGER_S later (closing with bytes unread would reset the connection,
        and the peer would lose the GOAWAY)."""
        transport, loop = self._transport, self._loop
        if transport is None or transport.is_closing():
            return
        if loop is None or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        loop.call_later(LINGER_S, transport.close)

    def _forget_all(self) -> None:
        self._dead = True
        self._pool.connections.discard(self)
        self._release(self._held)
        for stream in self._streams.values():
            _ended(stream)
        self._streams.clear()
        self._wait_stream.clear()
        self._wait_connection.clear()
        self._buffer.clear()
        for handle in (self._idle_timer, self._next_turn):
            if handle is not None:
                handle.cancel()
        self._idle_timer = self._next_turn = None

    def _check_idle(self) -> None:
        """Close a connection without its preface by the first check, or idle for the timeout.

        Otherwise the timer is set again for when the timeout would end: ``idle_timeout_s``
        after the last stream ended, or from now while streams are open (checked again then).
        """
        self._idle_timer = None
        loop = self._loop
        if loop is None or self._dead:
            return
        if not self._settings_seen:
            self.close(linger=True)
            return
        now, timeout = loop.time(), self._pool.limits.idle_timeout_s
        due = now + timeout if self._streams else self._idle_since + timeout
        if due <= now:
            self.close(linger=True)
        else:
            self._idle_timer = loop.call_later(due - now, self._check_idle)

    def _remove(self, stream_id: int) -> _Stream | None:
        """Take the stream out; the connection's idle time starts when its last one goes."""
        stream = self._streams.pop(stream_id, None)
        if not self._streams and self._loop is not None:
            self._idle_since = self._loop.time()
        return stream

    # -- the work of one turn, and the one place errors are made ---------------------------

    def _turn(self) -> None:
        """Handle the buffered frames this turn's budget allows; the rest waits a turn."""
        self._next_turn = None
        if self._dead:
            return
        self._budget = self._pool.limits.work_per_turn
        try:
            self._consume()
        except Exception as exc:  # every exception ends up on the wire, in _fail
            self._fail(exc)
        if self._dead:
            return
        self._flush_out()
        if self._budget <= 0 and len(self._buffer) >= w.FRAME_HEADER and self._loop is not None:
            self._next_turn = self._loop.call_soon(self._turn)
        if (self._write_blocked or self._next_turn is not None) != self._reading_paused:
            self._update_reading()
        if self._draining and not self._streams:
            self.close()

    def _update_reading(self) -> None:
        paused = self._write_blocked or self._next_turn is not None
        transport = self._transport
        if paused != self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _fail(self, exc: Exception, stream_id: int | None = None) -> None:
        """Turn an exception into the error RFC 9113 or gRPC names, for a stream or the connection.

        ``stream_id`` is given when ``exc`` came out of that stream's handler.
        """
        if isinstance(exc, w.StreamViolation):
            self._out.append(w.rst_stream(exc.stream, exc.code))
            self._forget(exc.stream)
        elif isinstance(exc, w.ProtocolViolation):
            self._abort(exc.code)
        elif stream_id is not None and (stream := self._streams.get(stream_id)) is not None:
            log.error("a handler failed", exc_info=exc)
            self._finish(stream_id, stream, INTERNAL, "internal error")
        else:
            log.error("HTTP/2 connection failed", exc_info=exc)
            self._abort(w.INTERNAL_ERROR)

    def _abort(self, code: int) -> None:
        """A connection error: GOAWAY with ``code``, and close."""
        if self._dead:
            return
        self._out.append(w.goaway(self._last_stream, code))
        self._flush_out()
        self._forget_all()
        self._linger()

    # -- memory held over all connections ----------------------------------------------------

    def _shed(self) -> None:
        """Over the budget: the connection holding most is sent away (this one, or another)."""
        pool = self._pool
        if pool.held > pool.limits.memory_budget:
            greediest = max(pool.connections, key=lambda c: c._held, default=self)
            if greediest is self:
                raise w.ProtocolViolation(w.ENHANCE_YOUR_CALM, "over the server's memory budget")
            greediest._abort(w.ENHANCE_YOUR_CALM)

    def _release(self, size: int) -> None:
        self._held -= size
        self._pool.held -= size

    # -- frames in ---------------------------------------------------------------------------

    def _consume(self) -> None:
        buffer = self._buffer
        offset = 0
        if not self._preface_seen:
            if len(buffer) < len(w.PREFACE):
                if w.PREFACE[: len(buffer)] != buffer:
                    raise w.ProtocolViolation(w.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            if buffer[: len(w.PREFACE)] != w.PREFACE:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._preface_seen, offset = True, len(w.PREFACE)
        try:
            while self._budget > 0 and len(buffer) - offset >= w.FRAME_HEADER:
                length, kind, flags, stream_id = w.parse_head(buffer, offset)
                if length > w.DEFAULT_MAX_FRAME:
                    raise w.ProtocolViolation(
                        w.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE"
                    )
                start = offset + w.FRAME_HEADER
                end = start + length
                if len(buffer) < end:
                    break
                offset = end
                self._budget -= 1 + (length >> 8)
                try:
                    self._on_frame(kind, flags, stream_id, bytes(buffer[start:end]))
                except w.StreamViolation as exc:
                    self._fail(exc)
        finally:
            del buffer[:offset]

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != w.CONTINUATION:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "header block interrupted")
        if not self._settings_seen and (kind != w.SETTINGS or flags & w.ACK):
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "the first frame must be SETTINGS")
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
            self._on_ping(flags, stream_id, payload)
        elif kind == w.RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif kind == w.PRIORITY:
            self._on_priority(stream_id, payload)
        elif kind == w.GOAWAY:
            self._on_goaway(stream_id, payload)
        elif kind == w.PUSH_PROMISE:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "clients must not push")
        # Unknown frame types are ignored, as RFC 9113 asks.

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
        if not flags & w.ACK:
            self._out.append(w.frame(w.PING, w.ACK, 0, payload))

    def _on_priority(self, stream_id: int, payload: bytes) -> None:
        """Priorities are not used, but a malformed PRIORITY is still an error (RFC 9113 6.3)."""
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise w.StreamViolation(stream_id, w.FRAME_SIZE_ERROR, "PRIORITY must be 5 bytes")

    def _on_goaway(self, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        self._draining = True

    def _on_headers_frame(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "HEADERS on an invalid stream id")
        fragment = w.unpad(flags, payload, priority_possible=True)
        if flags & w.END_HEADERS:
            self._on_headers(stream_id, fragment, bool(flags & w.END_STREAM))
        else:
            self._continuation = (stream_id, bytearray(fragment), flags, 1)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "unexpected CONTINUATION")
        _, block, first_flags, frames = self._continuation
        if len(block) + len(payload) > MAX_HEADER_BLOCK or frames >= MAX_HEADER_FRAMES:
            raise w.ProtocolViolation(w.ENHANCE_YOUR_CALM, "header block too large")
        block += payload
        self._continuation = (stream_id, block, first_flags, frames + 1)
        if flags & w.END_HEADERS:
            self._continuation = None
            self._on_headers(stream_id, bytes(block), bool(first_flags & w.END_STREAM))

    def _on_headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        self._budget -= len(block) >> 4
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
        elif stream.peer_ended:
            raise w.StreamViolation(stream_id, w.STREAM_CLOSED, "HEADERS after END_STREAM")
        elif not end_stream:
            raise w.StreamViolation(stream_id, w.PROTOCOL_ERROR, "trailers without END_STREAM")
        if end_stream:
            stream.peer_ended = True
            self._pump(stream_id, stream)

    def _open(self, stream_id: int, path: bytes) -> _Stream:
        opener = self._pool.openers.get(path)
        # A Call's fields are _Stream's first three, in order.
        stream = _Stream(*opener()) if opener is not None else _Stream(self._methods.get(path))
        self._streams[stream_id] = stream
        if stream.method is None:
            text = f"unknown method {path[:100].decode(errors='replace')}"
            self._finish(stream_id, stream, UNIMPLEMENTED, text)
        return stream

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "DATA on stream 0")
        if len(payload) > self._recv_window:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_window -= len(payload)
        stream = self._streams.get(stream_id)
        if stream is None or stream.closed or stream.peer_ended:
            if stream_id > self._last_stream:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "DATA on an idle stream")
            self._unacked += len(payload)  # not handed on, but counted
            if stream is not None and stream.peer_ended:
                raise w.StreamViolation(stream_id, w.STREAM_CLOSED, "DATA after END_STREAM")
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
        if content:
            stream.data += content
            size = len(content)
            self._held += size
            pool = self._pool
            pool.held += size
            if pool.held > pool.limits.memory_budget:
                self._shed()
        if flags & w.END_STREAM:
            stream.peer_ended = True
        self._pump(stream_id, stream)

    def _pump(self, stream_id: int, stream: _Stream) -> None:
        """Hand on the stream's complete messages; end the call once the client ended it."""
        self._on_messages(stream_id, stream)
        if stream.peer_ended and not stream.outbox and not stream.closed:
            if stream.data:  # the client ended the call inside a message
                self._finish(stream_id, stream, INTERNAL, "the call ended inside a message")
            elif stream.on_client_end is not None:  # client-streaming: its one answer now
                self._answer_client_end(stream_id, stream, stream.on_client_end)
            else:  # the client ended the call: end ours too
                self._finish(stream_id, stream, 0, "")

    def _answer_client_end(
        self, stream_id: int, stream: _Stream, on_client_end: Callable[[], Reply]
    ) -> None:
        stream.on_client_end = None
        self._budget -= HANDLER_WORK
        try:
            answer, status, text = on_client_end()
        except Exception as exc:  # a handler's bug fails its call, in _fail
            self._fail(exc, stream_id)
            return
        if answer is not None:
            self._send_message(stream_id, stream, answer)
        self._finish(stream_id, stream, 0 if status is None else status, text)

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
            self._held -= 5 + size
            self._pool.held -= 5 + size
            self._unacked += 5 + size
            stream.unacked += 5 + size
            if compressed:
                self._finish(
                    stream_id, stream, UNIMPLEMENTED, "compressed messages are not supported"
                )
                return
            if stream.method is None:  # unknown methods are finished when opened
                return
            self._budget -= HANDLER_WORK
            try:
                answer, status, text = stream.method(message)
            except Exception as exc:  # a handler's bug fails its call, in _fail
                self._fail(exc, stream_id)
                return
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
        if stream_id != 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & w.ACK:
            if payload:
                raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        self._settings_seen = True
        for key, value in _SETTING.iter_unpack(payload):
            self._on_setting(key, value)
        self._out.append(w.frame(w.SETTINGS, w.ACK, 0))

    def _on_setting(self, key: int, value: int) -> None:
        if key == w.SETTINGS_INITIAL_WINDOW_SIZE:
            self._set_peer_window(value)
        elif key == w.SETTINGS_MAX_FRAME_SIZE:
            if not w.DEFAULT_MAX_FRAME <= value <= w.MAX_FRAME_LIMIT:
                raise w.ProtocolViolation(w.PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
            self._peer_max_frame = value
        elif key == w.SETTINGS_ENABLE_PUSH and value > 1:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
        elif (
            key == w.SETTINGS_HEADER_TABLE_SIZE
            and value < w.DEFAULT_HEADER_TABLE
            and not self._table_zeroed
        ):  # our blocks never use the table: say so once, at the start of the next one
            self._table_update = self._table_zeroed = True

    def _set_peer_window(self, value: int) -> None:
        """A new SETTINGS_INITIAL_WINDOW_SIZE moves every stream's window by the change.

        Windows are kept as credit over the initial window, so that costs nothing
        per stream; only streams that were waiting for their own window are tried.
        """
        if value > w.MAX_WINDOW:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "initial window too large")
        if value + self._max_credit > w.MAX_WINDOW:  # the bound may be stale: find the real one
            self._budget -= len(self._streams)
            self._max_credit = max((s.send_credit for s in self._streams.values()), default=0)
            if value + self._max_credit > w.MAX_WINDOW:
                raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "a stream window overflows")
        grew = value > self._peer_window
        self._peer_window = value
        if grew and self._wait_stream:
            waiting, self._wait_stream = self._wait_stream, {}
            self._budget -= len(waiting)
            for stream_id in waiting:
                stream = self._streams[stream_id]
                stream.waiting = False
                self._resume(stream_id, stream)

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
        """Streams waiting for the connection's window send, in order, while it lasts."""
        if increment == 0:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "connection window update of 0")
        if self._send_window + increment > w.MAX_WINDOW:
            raise w.ProtocolViolation(w.FLOW_CONTROL_ERROR, "connection window overflows")
        self._send_window += increment
        waiting = self._wait_connection
        while self._send_window > 0 and waiting:
            stream_id = next(iter(waiting))
            del waiting[stream_id]
            stream = self._streams[stream_id]
            stream.waiting = False
            self._budget -= 1
            self._resume(stream_id, stream)

    def _grow_stream_window(self, stream_id: int, stream: _Stream, increment: int) -> None:
        """Bad updates are stream errors (RFC 9113 6.9): only that stream is reset."""
        if increment == 0:
            raise w.StreamViolation(stream_id, w.PROTOCOL_ERROR, "stream window update of 0")
        if self._peer_window + stream.send_credit + increment > w.MAX_WINDOW:
            raise w.StreamViolation(stream_id, w.FLOW_CONTROL_ERROR, "stream window overflows")
        stream.send_credit += increment
        self._max_credit = max(self._max_credit, stream.send_credit)
        if stream_id in self._wait_stream and self._peer_window + stream.send_credit > 0:
            del self._wait_stream[stream_id]
            stream.waiting = False
            self._resume(stream_id, stream)

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise w.ProtocolViolation(w.FRAME_SIZE_ERROR, "RST_STREAM payload must be 4 bytes")
        if stream_id == 0 or stream_id > self._last_stream:
            raise w.ProtocolViolation(w.PROTOCOL_ERROR, "RST_STREAM on stream 0 or an idle one")
        self._forget(stream_id)

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
            _ended(stream)
            self._drop_data(stream)
            block = w.OK_TRAILERS if status == 0 and not text else w.trailers(status, text)
            if not stream.started:
                block = w.RESPONSE_HEADERS + block
            flags = w.END_HEADERS | w.END_STREAM
            stream.outbox.append((False, w.frame(w.HEADERS, flags, stream_id, block)))
        self._flush_stream(stream_id, stream)

    def _forget(self, stream_id: int) -> None:
        """The stream is over (reset by either side): drop all it holds."""
        stream = self._remove(stream_id)
        if stream is not None:
            _ended(stream)
            if stream.waiting:
                self._wait_stream.pop(stream_id, None)
                self._wait_connection.pop(stream_id, None)
            self._drop_data(stream)

    def _drop_data(self, stream: _Stream) -> None:
        """Bytes of a call that is over will never be handed on: reopen the window for them."""
        self._unacked += len(stream.data)
        self._release(len(stream.data))
        stream.data.clear()
        self._give_back(0, None)

    def _flush_stream(self, stream_id: int, stream: _Stream) -> None:
        """Move what flow control allows from the stream's outbox to the write buffer."""
        outbox = stream.outbox
        while outbox:
            is_data, chunk = outbox[0]
            if is_data:
                window = self._peer_window + stream.send_credit
                allowed = min(self._send_window, window, self._peer_max_frame)
                if allowed <= 0:  # wait in the queue of the window that is closed
                    stream.waiting = True
                    if window <= 0:
                        self._wait_stream[stream_id] = None
                    else:
                        self._wait_connection[stream_id] = None
                    return
                piece, rest = chunk[:allowed], chunk[allowed:]
                self._out.append(w.frame(w.DATA, 0, stream_id, piece))
                self._send_window -= len(piece)
                stream.send_credit -= len(piece)
                if rest:
                    outbox[0] = (True, rest)
                    continue
            elif self._table_update:  # the first header block since the peer shrank its table
                self._table_update = False
                block = w.TABLE_SIZE_ZERO + chunk[w.FRAME_HEADER :]
                self._out.append(w.frame(w.HEADERS, chunk[4], stream_id, block))
            else:
                self._out.append(chunk)
            outbox.popleft()
        if stream.closed:
            self._remove(stream_id)

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

    def __init__(
        self,
        methods: Mapping[bytes, Method],
        limits: Limits | None = None,
        openers: Mapping[bytes, Opener] | None = None,
    ) -> None:
        self.pool = Pool(methods, limits or Limits(), openers)
        self._connections = self.pool.connections
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: GrpcConnection(self.pool),
            host,
            port,
            reuse_port=reuse_port or None,
            reuse_address=True,
        )

    async def start_unix(self, path: Path) -> None:
        """Listen on a Unix socket (``path`` must not be in use: see ``unixsocket.prepare``)."""
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: GrpcConnection(self.pool), str(path)
        )

    @property
    def port(self) -> int:
        """The port listened on (useful when started on port 0)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
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


def _ended(stream: _Stream) -> None:
    """Run the call's end hook once; its failure is logged, never the connection's."""
    on_end, stream.on_end = stream.on_end, None
    if on_end is not None:
        try:
            on_end()
        except Exception:
            log.exception("ending a call failed")
