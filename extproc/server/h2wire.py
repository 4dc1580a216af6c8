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
from hpack.huffman_table import decode_huffman

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
MAX_CACHED_STRING = 256  # longer Huffman strings are decoded each time, never kept
MAX_CACHED_STRINGS = 64  # the cache is emptied when it holds this many
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


class _NeedsFullDecode(Exception):
    """The block changes HPACK's dynamic table: only the full decoder may handle it."""


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


def _scan(block: bytes) -> None:
    """Check a block's structure before hpack decodes it: capped integers, strings inside
    the block, at most MAX_HEADER_FIELDS fields (table size updates included)."""
    at, fields = 0, 0
    while at < len(block):
        fields += 1
        if fields > MAX_HEADER_FIELDS:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, "too many header fields")
        byte = block[at]
        if byte & 0x80:  # indexed
            _, at = _integer(block, at, 7)
            continue
        if byte & 0xE0 == 0x20:  # dynamic table size update
            _, at = _integer(block, at, 5)
            continue
        index, at = _integer(block, at, 6 if byte & 0x40 else 4)
        for _ in range(1 if index else 2):  # the name unless indexed, then the value
            length, at = _integer(block, at, 7)
            at += length
            if at > len(block):
                raise IndexError("string runs past the block")


class HeaderDecoder:
    """Decodes request header blocks, keeping HPACK's dynamic table in step with the peer.

    Envoy re-sends the same request headers on every stream: references into
    the tables, and ``:path`` as a literal that is never added to the table.
    Neither changes the dynamic table, so such blocks are read directly, with
    the (Huffman-coded) path string memoised. A block with any field that
    changes the table goes through the full decoder, after a scan of its
    structure (integer lengths, field count) so that hpack's work is bounded too.
    """

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._table = self._decoder.header_table
        self._strings: dict[bytes, bytes] = {}  # Huffman-coded path → path

    def path(self, block: bytes) -> bytes:
        """The ``:path`` of a request header block (b"" if it has none)."""
        try:
            try:
                return self._read_without_table_changes(block)
            except _NeedsFullDecode:
                _scan(block)
                fields = self._decoder.decode(block, raw=True)
                return next((bytes(value) for name, value in fields if name == b":path"), b"")
        except (hpack.HPACKError, IndexError, ValueError, UnicodeError) as exc:
            reason = f"bad header block: {type(exc).__name__}"
            raise ProtocolViolation(COMPRESSION_ERROR, reason) from None

    def _read_without_table_changes(self, block: bytes) -> bytes:
        path, at, fields = b"", 0, 0
        while at < len(block):
            fields += 1
            if fields > MAX_HEADER_FIELDS:
                raise ProtocolViolation(ENHANCE_YOUR_CALM, "too many header fields")
            byte = block[at]
            if byte & 0x80:  # indexed field
                index, at = _integer(block, at, 7)
                name, value = self._table.get_by_index(index)
                if name == b":path":
                    path = bytes(value)
            elif byte & 0xE0 == 0:  # 0000xxxx / 0001xxxx: literal without indexing / never indexed
                index, at = _integer(block, at, 4)
                if index:
                    name = bytes(self._table.get_by_index(index)[0])
                else:  # a new name: only a short string can be ":path"
                    name, at = self._string(block, at, decode=block[at] & 0x7F <= len(b":path"))
                value, at = self._string(block, at, decode=name == b":path")
                if name == b":path":
                    path = value
            else:  # incremental indexing or a table size update
                raise _NeedsFullDecode
        return path

    def _string(self, block: bytes, at: int, decode: bool) -> tuple[bytes, int]:
        huffman = bool(block[at] & 0x80)
        length, at = _integer(block, at, 7)
        raw, end = block[at : at + length], at + length
        if end > len(block):
            raise IndexError("string runs past the block")
        if not decode or not huffman:
            return raw, end
        if length > MAX_CACHED_STRING:
            return bytes(decode_huffman(raw)), end
        known = self._strings.get(raw)
        if known is None:
            known = bytes(decode_huffman(raw))
            if len(self._strings) >= MAX_CACHED_STRINGS:
                self._strings.clear()
            self._strings[raw] = known
        return known, end
