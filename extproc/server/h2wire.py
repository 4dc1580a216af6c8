"""HTTP/2 framing and header blocks for a small gRPC server (RFC 9113, RFC 7541).

Only what a gRPC server needs: frames in, frames out, request header blocks
decoded, and response header blocks that never touch HPACK's dynamic table,
so they are precomputed bytes that stay valid for any peer state.
"""

from __future__ import annotations

import struct
from urllib.parse import quote

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

SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5

NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x9, 0xB

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = 2**24 - 1  # the largest SETTINGS_MAX_FRAME_SIZE a peer may announce
MAX_WINDOW = 2**31 - 1


class ProtocolViolation(Exception):
    """A connection-level protocol error: answer GOAWAY with ``code`` and close."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
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


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as "literal without indexing, new name" (no dynamic table, no Huffman)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


# :status 200 is static table entry 8; content-type (31) by index, its value as a literal.
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + bytes((len(b"application/grpc"),)) + b"application/grpc"


def trailers(status: int, message: str = "") -> bytes:
    """The trailer block ending a call: grpc-status and, for errors, grpc-message."""
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", quote(message[:100], safe=" ").encode())
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
    """An HPACK integer (RFC 7541 5.1) starting at ``at``; returns (value, next offset)."""
    mask = (1 << prefix_bits) - 1
    value = block[at] & mask
    at += 1
    if value < mask:
        return value, at
    shift = 0
    while True:
        byte = block[at]
        at += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


class HeaderDecoder:
    """Decodes request header blocks, keeping HPACK's dynamic table in step with the peer.

    Envoy re-sends the same request headers on every stream: references into
    the tables, and ``:path`` as a literal that is never added to the table.
    Neither changes the dynamic table, so such blocks are read directly, with
    the (Huffman-coded) path string memoised. A block with any field that
    changes the table goes through the full decoder.
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
                fields = self._decoder.decode(block, raw=True)
                return next((bytes(value) for name, value in fields if name == b":path"), b"")
        except (hpack.HPACKError, IndexError) as exc:
            raise ProtocolViolation(COMPRESSION_ERROR, f"bad header block: {exc}") from None

    def _read_without_table_changes(self, block: bytes) -> bytes:
        path, at = b"", 0
        while at < len(block):
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
                else:
                    name, at = self._string(block, at, decode=True)
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
        known = self._strings.get(raw)
        if known is None:
            known = bytes(decode_huffman(raw))
            if len(self._strings) < 64:
                self._strings[raw] = known
        return known, end
