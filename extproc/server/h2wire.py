"""HTTP/2 framing and header blocks for a small gRPC server (RFC 9113, RFC 7541).

Only what a gRPC server needs: frames in, frames out, request header blocks
decoded, and response header blocks that never touch HPACK's dynamic table,
so they are precomputed bytes that stay valid for any peer state.

Nothing here relies on ``assert``: every length is checked or encoded in full,
so the bytes on the wire are the same under ``python -O``.
"""

from __future__ import annotations

import struct

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9

END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x5, 0x6, 0x7
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = 2**24 - 1  # the largest SETTINGS_MAX_FRAME_SIZE a peer may announce
MAX_WINDOW = 2**31 - 1
DEFAULT_HEADER_TABLE = 4096  # HPACK's dynamic table size until the peer's SETTINGS say otherwise
MAX_INTEGER_BYTES = 4  # HPACK integer continuation bytes read at most: values up to 2^28 + 254
MAX_CACHED_BLOCK = 512  # longer header blocks are decoded each time, never kept
MAX_CACHED_BLOCKS = 64  # the cache is emptied when it holds this many
MAX_HEADER_FIELDS = 64  # fields in one request header block (Envoy sends about ten)
MAX_GRPC_MESSAGE = 200  # bytes of grpc-message text sent at most (before percent-encoding)


class ProtocolViolation(Exception):
    """A connection-level protocol error: answer GOAWAY with ``code`` and close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class StreamViolation(Exception):
    """A stream-level protocol error (RFC 9113 5.4.2): RST_STREAM ``stream`` with ``code``."""

    def __init__(self, stream: int, code: int, reason: str) -> None:
        super().__init__(reason)
        self.stream = stream
        self.code = code


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def settings(values: dict[int, int]) -> bytes:
    body = b"".join(
        key.to_bytes(2, "big") + value.to_bytes(4, "big") for key, value in values.items()
    )
    return frame(SETTINGS, 0, 0, body)


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def goaway(last_stream: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, last_stream.to_bytes(4, "big") + code.to_bytes(4, "big"))


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, code.to_bytes(4, "big"))


def integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1): ``flags`` fill the first byte's bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as "literal without indexing, new name" (no dynamic table, no Huffman)."""
    return b"\x00" + integer(len(name), 7) + name + integer(len(value), 7) + value


# Sent before the first header block after a peer shrank SETTINGS_HEADER_TABLE_SIZE (RFC 7541
# 4.2): our table's size becomes 0, which fits any size the peer may announce later.
TABLE_SIZE_ZERO = integer(0, 5, 0x20)


# :status 200 is static table entry 8; content-type (31) by index, its value as a literal.
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + bytes((len(b"application/grpc"),)) + b"application/grpc"


def grpc_message(text: str) -> bytes:
    """``text`` as gRPC's grpc-message value: UTF-8, then %XX for bytes outside ' '..'~' and '%'.

    At most MAX_GRPC_MESSAGE bytes of text are kept (cut on a character boundary).
    """
    raw = text.encode("utf-8", "replace")[:MAX_GRPC_MESSAGE].decode("utf-8", "ignore").encode()
    return b"".join(
        bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte
        for byte in raw
    )


def trailers(status: int, message: str = "") -> bytes:
    """The trailer block ending a call: grpc-status and, for errors, grpc-message."""
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", grpc_message(message))
    return block


OK_TRAILERS = trailers(0)


_HEAD = struct.Struct(">BHBBL")  # length (24 bits: high byte, low 16), type, flags, stream


def parse_head(buffer: bytearray | bytes, offset: int) -> tuple[int, int, int, int]:
    """A frame's (length, type, flags, stream id), read in place from ``buffer``."""
    high, low, kind, flags, stream = _HEAD.unpack_from(buffer, offset)
    return high << 16 | low, kind, flags, stream & 0x7FFFFFFF


def unpad(flags: int, payload: bytes, priority_possible: bool) -> bytes:
    """The frame's content without padding (and without HEADERS' priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise ProtocolViolation(PROTOCOL_ERROR, "padded frame without pad length")
        start, end = 1, end - payload[0]
    if priority_possible and flags & PRIORITY_FLAG:
        start += 5
    if end < start:
        raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[start:end]


def _integer(block: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) starting at ``at``; returns (value, next offset).

    At most MAX_INTEGER_BYTES continuation bytes: a longer one is a decoding error
    (RFC 7541 5.1 lets a decoder set this limit), so the work is a few steps.
    """
    mask = (1 << prefix_bits) - 1
    value = block[at] & mask
    at += 1
    if value < mask:
        return value, at
    for shift in range(0, 7 * MAX_INTEGER_BYTES, 7):
        byte = block[at]
        at += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    raise ValueError("HPACK integer longer than MAX_INTEGER_BYTES")


def _scan(block: bytes) -> bool:
    """Check a block's structure before hpack decodes it: capped integers, strings inside
    the block, at most MAX_HEADER_FIELDS fields (table size updates included).

    Returns whether the block changes HPACK's dynamic table (incremental indexing or a
    table size update): only then may the same bytes mean other headers later.
    """
    at, fields, changes = 0, 0, False
    while at < len(block):
        fields += 1
        if fields > MAX_HEADER_FIELDS:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, "too many header fields")
        byte = block[at]
        if byte & 0x80:  # indexed
            _, at = _integer(block, at, 7)
            continue
        if byte & 0xE0 == 0x20:  # dynamic table size update
            changes = True
            _, at = _integer(block, at, 5)
            continue
        indexing = bool(byte & 0x40)
        changes |= indexing
        index, at = _integer(block, at, 6 if indexing else 4)
        for _ in range(1 if index else 2):  # the name unless indexed, then the value
            length, at = _integer(block, at, 7)
            at += length
            if at > len(block):
                raise IndexError("string runs past the block")
    return changes


class HeaderDecoder:
    """Decodes request header blocks, keeping HPACK's dynamic table in step with the peer.

    Only hpack's public API is used (``Decoder.decode``), so any hpack 4.x works. Envoy
    re-sends the same block on every stream of a connection: references into the tables
    and ``:path`` as a literal never added to the table. Such a block cannot change the
    dynamic table, so its bytes mean the same headers until a block that does change it:
    its ``:path`` is memoised by the block's bytes (a dict lookup instead of a ~18 µs
    decode), and the memo is emptied whenever a block changes the table. Every block that
    is decoded is scanned first (integer lengths, field count), so hpack's work is bounded.
    """

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._paths: dict[bytes, bytes] = {}  # a block that leaves the table alone → its :path

    def path(self, block: bytes) -> bytes:
        """The ``:path`` of a request header block (b"" if it has none)."""
        known = self._paths.get(block)
        if known is not None:
            return known
        try:
            changes_table = _scan(block)
            fields = self._decoder.decode(block, raw=True)
        except (hpack.HPACKError, IndexError, ValueError, UnicodeError) as exc:
            reason = f"bad header block: {type(exc).__name__}"
            raise ProtocolViolation(COMPRESSION_ERROR, reason) from None
        path = next((bytes(value) for name, value in fields if name == b":path"), b"")
        if changes_table:
            self._paths.clear()
        elif len(block) <= MAX_CACHED_BLOCK:
            if len(self._paths) >= MAX_CACHED_BLOCKS:
                self._paths.clear()
            self._paths[block] = path
        return path
