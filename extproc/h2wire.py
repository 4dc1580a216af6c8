"""HTTP/2 framing and header blocks for a small gRPC server (RFC 9113, RFC 7541).

Only what a gRPC server needs: frames in, frames out, request header blocks
decoded, and response header blocks that never touch HPACK's dynamic table,
so they are precomputed bytes that stay valid for any peer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

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
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5

NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
COMPRESSION_ERROR = 0x9

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
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


@dataclass(frozen=True, slots=True)
class FrameHead:
    length: int
    kind: int
    flags: int
    stream: int


def parse_head(buffer: bytearray | bytes, offset: int) -> FrameHead:
    raw = buffer[offset : offset + FRAME_HEADER]
    stream = int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF
    return FrameHead(int.from_bytes(raw[0:3], "big"), raw[3], raw[4], stream)


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


class HeaderDecoder:
    """Decodes request header blocks, keeping HPACK's dynamic table in step with the peer.

    Envoy re-sends the same request headers on every stream, so after the
    first stream each block is a few one-byte references into the tables;
    those are resolved directly (a reference never changes the table). Any
    other block goes through the full decoder.
    """

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._table = self._decoder.header_table

    def path(self, block: bytes) -> bytes:
        """The ``:path`` of a request header block (b"" if it has none)."""
        try:
            if all(byte > 0x80 and byte != 0xFF for byte in block):  # indexed fields, 7-bit index
                for byte in block:
                    name, value = self._table.get_by_index(byte & 0x7F)
                    if name == b":path":
                        return bytes(value)
                return b""
            fields = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise ProtocolViolation(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        return next((bytes(value) for name, value in fields if name == b":path"), b"")
