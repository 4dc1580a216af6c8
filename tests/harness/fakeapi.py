"""Answers shaped like the real Anthropic and OpenAI APIs, for a ``RecordingUpstream``.

The real clients (the SDKs, Claude Code) parse what they get back, so the
upstream behind the gateway must answer the way the providers do: the same
JSON fields, the same server-sent events in the same order, ``usage`` where
the clients read it. Each function here is a ``Responder``::

    RecordingUpstream("anthropic-upstream", responder=anthropic_api)
    RecordingUpstream("openai-upstream", responder=openai_api)  # route upstream: <url>/v1

Every reply says ``REPLY_TEXT``; the recording upstream keeps the headers.
``HEAD`` on any path answers 200 with no body (Claude Code's first request is
``HEAD <base URL>``); an unknown path answers 404 in the API's error shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from harness.upstream import RecordedRequest, Reply

REPLY_TEXT = "Hello from the fake upstream."
ANTHROPIC_MODELS = ("claude-sonnet-5-5", "claude-haiku-5-5")
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4.1")
_CREATED = 1_760_000_000  # a fixed timestamp: replies are the same on every run
_SSE = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))


# -- Anthropic ----------------------------------------------------------------------------------


def anthropic_api(request: RecordedRequest) -> Reply:
    """The Anthropic Messages API: messages (JSON and SSE), count_tokens, models; HEAD."""
    return _dispatch(request, _ANTHROPIC, _anthropic_error)


def _anthropic_messages(body: dict[str, Any]) -> Reply:
    if body.get("stream"):
        return Reply(200, chunks=anthropic_events(body), headers=_SSE)
    return _json(200, anthropic_message(body))


def _anthropic_count_tokens(body: dict[str, Any]) -> Reply:
    return _json(200, {"input_tokens": _input_tokens(body)})


def _anthropic_models(_body: dict[str, Any]) -> Reply:
    models = [
        {"type": "model", "id": model, "display_name": model, "created_at": "2025-09-29T00:00:00Z"}
        for model in ANTHROPIC_MODELS
    ]
    first, last = models[0]["id"], models[-1]["id"]
    return _json(200, {"data": models, "has_more": False, "first_id": first, "last_id": last})


def anthropic_message(body: dict[str, Any]) -> dict[str, Any]:
    """A complete ``message`` object answering ``body``."""
    return {
        "id": "msg_fake0001",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", ANTHROPIC_MODELS[0]),
        "content": [{"type": "text", "text": REPLY_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(body, _output_tokens()),
    }


def anthropic_events(body: dict[str, Any]) -> tuple[bytes, ...]:
    """The SSE events of a streamed message, in the order the API sends them."""
    start = {**anthropic_message(body), "content": [], "stop_reason": None}
    start["usage"] = _anthropic_usage(body, 1)
    head, tail = REPLY_TEXT[:5], REPLY_TEXT[5:]  # two deltas: the client must join them
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        *[("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": text}})
          for text in (head, tail)],
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": _output_tokens()}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return tuple(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def _anthropic_usage(body: dict[str, Any], output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": _input_tokens(body),
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _anthropic_error(status: int, kind: str, message: str) -> Reply:
    return _json(status, {"type": "error", "error": {"type": kind, "message": message}})


# -- OpenAI -------------------------------------------------------------------------------------


def openai_api(request: RecordedRequest) -> Reply:
    """The OpenAI API under ``/v1``: chat completions (JSON and SSE), models; HEAD."""
    return _dispatch(request, _OPENAI, _openai_error)


def _openai_chat(body: dict[str, Any]) -> Reply:
    if body.get("stream"):
        return Reply(200, chunks=openai_chunks(body), headers=_SSE)
    return _json(200, openai_completion(body))


def _openai_models(_body: dict[str, Any]) -> Reply:
    models = [
        {"id": model, "object": "model", "created": _CREATED, "owned_by": "openai"}
        for model in OPENAI_MODELS
    ]
    return _json(200, {"object": "list", "data": models})


def openai_completion(body: dict[str, Any]) -> dict[str, Any]:
    """A complete ``chat.completion`` answering ``body``."""
    return {
        "id": "chatcmpl-fake0001",
        "object": "chat.completion",
        "created": _CREATED,
        "model": body.get("model", OPENAI_MODELS[0]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY_TEXT, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _openai_usage(body),
    }


def openai_chunks(body: dict[str, Any]) -> tuple[bytes, ...]:
    """The SSE ``data:`` lines of a streamed completion, ending in ``data: [DONE]``.

    With ``stream_options.include_usage`` every chunk carries ``"usage": null`` and
    a last chunk with no choices carries the usage, as the API does.
    """
    with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    common = {
        "id": "chatcmpl-fake0001",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": body.get("model", OPENAI_MODELS[0]),
    }

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**common, "choices": [choice], **({"usage": None} if with_usage else {})}

    head, tail = REPLY_TEXT[:5], REPLY_TEXT[5:]
    chunks = [
        chunk({"role": "assistant", "content": ""}, None),
        chunk({"content": head}, None),
        chunk({"content": tail}, None),
        chunk({}, "stop"),
    ]
    if with_usage:
        chunks.append({**common, "choices": [], "usage": _openai_usage(body)})
    lines = [f"data: {json.dumps(data)}\n\n".encode() for data in chunks]
    return (*lines, b"data: [DONE]\n\n")


def _openai_usage(body: dict[str, Any]) -> dict[str, int]:
    prompt = _input_tokens(body)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": _output_tokens(),
        "total_tokens": prompt + _output_tokens(),
    }


def _openai_error(status: int, kind: str, message: str) -> Reply:
    return _json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})


# -- shared -------------------------------------------------------------------------------------

Answer = Callable[[dict[str, Any]], Reply]  # the request's JSON body (empty for GET) → the reply
_ANTHROPIC: Mapping[tuple[str, str], Answer] = MappingProxyType({
    ("POST", "/v1/messages"): _anthropic_messages,
    ("POST", "/v1/messages/count_tokens"): _anthropic_count_tokens,
    ("GET", "/v1/models"): _anthropic_models,
})  # fmt: skip
_OPENAI: Mapping[tuple[str, str], Answer] = MappingProxyType({
    ("POST", "/v1/chat/completions"): _openai_chat,
    ("GET", "/v1/models"): _openai_models,
})  # fmt: skip


def _dispatch(
    request: RecordedRequest,
    answers: Mapping[tuple[str, str], Answer],
    error: Callable[[int, str, str], Reply],
) -> Reply:
    if request.method == "HEAD":
        return Reply(200)
    answer = answers.get((request.method, request.path))
    if answer is None:
        return error(404, "not_found_error", f"no {request.method} {request.path} here")
    body = _json_body(request) if request.method == "POST" else {}
    if body is None:
        return error(400, "invalid_request_error", "the body is not a JSON object")
    return answer(body)


def _json_body(request: RecordedRequest) -> dict[str, Any] | None:
    try:
        body = json.loads(request.body)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _input_tokens(body: dict[str, Any]) -> int:
    """A made-up but stable count: about four characters of the prompt per token."""
    prompt = json.dumps([body.get("system"), body.get("messages"), body.get("tools")])
    return max(1, len(prompt) // 4)


def _output_tokens() -> int:
    return len(REPLY_TEXT.split())


def _json(status: int, data: dict[str, Any]) -> Reply:
    return Reply(status, json.dumps(data).encode())
