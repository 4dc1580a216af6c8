"""Read the token usage a provider reports, from a response body fed chunk by chunk.

Pure and incremental: nothing here waits for a whole stream or guesses a
number the provider did not send. Anthropic Messages reports usage in the
JSON body, or in SSE events (``message_start``: input and cache tokens,
``message_delta``: output tokens so far); OpenAI chat completions in the JSON
body, or in the final SSE chunk when the client asked for it. Events that
carry no usage (the text deltas, nearly all of a stream) are skipped after a
substring test, without JSON parsing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from extproc.config.model import ErrorStyle

MAX_JSON_BODY = 8 << 20  # a larger non-streamed body is not parsed: usage unknown
MAX_SSE_LINE = 1 << 20  # a longer SSE line is skipped (it is never a usage event)
_OPENAI_USAGE = re.compile(rb'"usage"\s*:\s*\{')


class Endpoint(Enum):
    """What a request asked for, as far as usage goes."""

    MESSAGES = "messages"  # Anthropic Messages: reports usage
    CHAT = "chat"  # OpenAI chat completions: reports usage
    OTHER = "other"  # count_tokens, models, anything else: a request, no usage


def endpoint(style: ErrorStyle, path: str) -> Endpoint:
    """The endpoint of a request path as the client sent it (prefix and query included)."""
    bare = path.split("?", 1)[0].rstrip("/")
    if style is ErrorStyle.ANTHROPIC and bare.endswith("/messages"):
        return Endpoint.MESSAGES
    if style is ErrorStyle.OPENAI and bare.endswith("/chat/completions"):
        return Endpoint.CHAT
    return Endpoint.OTHER


@dataclass(slots=True)
class Usage:
    """Tokens by type as the provider reported them; None: not reported."""

    model: str = ""
    input: int | None = None  # not served from a cache
    output: int | None = None
    cache_creation: int | None = None
    cache_read: int | None = None

    @property
    def known(self) -> bool:
        return any(v is not None for v in (self.input, self.output))

    @property
    def total(self) -> int:
        """Every reported token, for token limits."""
        kinds = (self.input, self.output, self.cache_creation, self.cache_read)
        return sum(v for v in kinds if v is not None)

    def by_type(self) -> dict[str, int]:
        kinds = {
            "input": self.input,
            "output": self.output,
            "cache_creation": self.cache_creation,
            "cache_read": self.cache_read,
        }
        return {k: v for k, v in kinds.items() if v is not None}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _model(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _anthropic(usage: Usage, found: Any) -> None:
    if not isinstance(found, dict):
        return
    for key, attr in (
        ("input_tokens", "input"),
        ("output_tokens", "output"),
        ("cache_creation_input_tokens", "cache_creation"),
        ("cache_read_input_tokens", "cache_read"),
    ):
        count = _count(found.get(key))
        if count is not None:
            setattr(usage, attr, count)


def _openai(usage: Usage, found: Any) -> None:
    if not isinstance(found, dict):
        return
    prompt, output = _count(found.get("prompt_tokens")), _count(found.get("completion_tokens"))
    details = found.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    if prompt is not None:
        usage.input = prompt - min(cached or 0, prompt)
        usage.cache_read = cached
    if output is not None:
        usage.output = output


class UsageReader:
    """Usage from one response body, fed in the chunks Envoy observed."""

    def __init__(self, style: ErrorStyle, streaming: bool) -> None:
        self._style = style
        self._streaming = streaming
        self._buffer = bytearray()
        self._skipping = False  # inside an over-long SSE line
        self._too_big = False
        self.usage = Usage()

    def feed(self, chunk: bytes) -> None:
        if not self._streaming:
            if len(self._buffer) + len(chunk) > MAX_JSON_BODY:
                self._too_big = True
                self._buffer.clear()
            elif not self._too_big:
                self._buffer += chunk
            return
        # SSE lines end in LF, CRLF or a lone CR; a CRLF split over two chunks becomes
        # an extra empty line, which no event reading minds.
        self._buffer += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            if not self._skipping:
                self._line(bytes(self._buffer[start:end]))
            self._skipping = False
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > MAX_SSE_LINE:
            self._buffer.clear()
            self._skipping = True

    def finish(self) -> Usage:
        """The usage reported; call once, at the end of the body (or when it was cut)."""
        if not self._streaming and self._buffer and not self._too_big:
            self._json(bytes(self._buffer))
        elif self._streaming and self._buffer and not self._skipping:
            self._line(bytes(self._buffer))  # a last event without its newline
        self._buffer.clear()
        return self.usage

    def _json(self, body: bytes) -> None:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return
        if not isinstance(document, dict):
            return
        self.usage.model = _model(document.get("model"))
        if self._style is ErrorStyle.OPENAI:
            _openai(self.usage, document.get("usage"))
        else:
            _anthropic(self.usage, document.get("usage"))

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        if self._style is ErrorStyle.OPENAI:
            if _OPENAI_USAGE.search(line) is None:
                return
        elif b'"message_start"' not in line and b'"message_delta"' not in line:
            return
        try:
            event = json.loads(line[5:])
        except (ValueError, RecursionError):
            return
        if isinstance(event, dict):
            self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        if self._style is ErrorStyle.OPENAI:
            self.usage.model = _model(event.get("model")) or self.usage.model
            _openai(self.usage, event.get("usage"))
        elif event.get("type") == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            self.usage.model = _model(message.get("model"))
            _anthropic(self.usage, message.get("usage"))
        elif event.get("type") == "message_delta":
            _anthropic(self.usage, event.get("usage"))
