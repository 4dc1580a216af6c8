"""The providers' JSON error shapes, shared by the processor's answers and Envoy's own replies.

Every answer the gateway gives itself (a 401 from the processor, a 503 from Envoy when the
processor or the upstream cannot be reached) is parsed by the client's SDK, so it has the
shape of the route's provider and a message a person can act on.
"""

from __future__ import annotations

from typing import NamedTuple

from extproc.config.model import ErrorStyle


class ErrorKind(NamedTuple):
    """One kind of error as each provider's SDKs name it."""

    anthropic: str  # Anthropic's error.type
    openai_type: str  # OpenAI's error.type
    openai_code: str  # OpenAI's error.code


AUTHENTICATION = ErrorKind("authentication_error", "invalid_request_error", "invalid_api_key")
RATE_LIMIT = ErrorKind("rate_limit_error", "requests", "rate_limit_exceeded")
UNAVAILABLE = ErrorKind("overloaded_error", "server_error", "service_unavailable")
API_ERROR = ErrorKind("api_error", "server_error", "server_error")
INVALID = ErrorKind("invalid_request_error", "invalid_request_error", "invalid_request")
TOO_LARGE = ErrorKind("request_too_large", "invalid_request_error", "request_too_large")
NOT_FOUND = ErrorKind("not_found_error", "invalid_request_error", "unknown_url")


def error_json(style: ErrorStyle, message: str, kind: ErrorKind) -> dict[str, object]:
    """The body as the provider's SDKs parse it."""
    if style is ErrorStyle.OPENAI:
        error = {"message": message, "type": kind.openai_type, "param": None}
        return {"error": error | {"code": kind.openai_code}}
    return {"type": "error", "error": {"type": kind.anthropic, "message": message}}


def any_style_json(message: str, kind: ErrorKind) -> dict[str, object]:
    """For an answer on no route (so no provider): both SDKs find their fields in it.

    Anthropic's SDK reads ``error.type`` and ``error.message``, OpenAI's reads
    ``error.message`` and ``error.code``.
    """
    error = {"type": kind.anthropic, "message": message, "code": kind.openai_code}
    return {"type": "error", "error": error}
