"""Token usage read off response bodies fed chunk by chunk: tables per provider, no Envoy.

Every table case is also fed one byte at a time, and a hypothesis property
splits valid bodies of both providers anywhere: the usage never depends on
where Envoy cut the body.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config.model import ErrorStyle
from extproc.usage.parse import (
    MAX_JSON_BODY,
    MAX_SSE_LINE,
    Endpoint,
    Usage,
    UsageReader,
    endpoint,
)

ANTHROPIC, OPENAI = ErrorStyle.ANTHROPIC, ErrorStyle.OPENAI
JSON, SSE = False, True  # the reader's ``streaming`` flag
CLAUDE, GPT = "claude-sonnet-4-5-20250929", "gpt-4o-2024-08-06"


def read(style: ErrorStyle, streaming: bool, chunks: Iterable[bytes]) -> Usage:
    reader = UsageReader(style, streaming)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()


def split(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(body)]
    return [body[a:b] for a, b in pairwise(bounds)]


def one_byte_chunks(body: bytes) -> list[bytes]:
    return [body[i : i + 1] for i in range(len(body))]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- bodies as the providers send them ----------------------------------------------------


def anthropic_json(usage: Any, model: Any = CLAUDE) -> bytes:
    message = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    return dumps(message).encode()


def sse_event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {data if isinstance(data, str) else dumps(data)}\n\n"


def anthropic_stream(
    start_usage: dict[str, Any],
    delta_usage: dict[str, Any] | None,
    texts: Iterable[str] = ("Hello", ", wor", "ld! ", "été ✓"),
    model: Any = CLAUDE,
    newline: str = "\n",
) -> bytes:
    """A stream shaped like the API's: message_start, ping, content, message_delta, stop."""
    message = {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events = [
        sse_event("message_start", {"type": "message_start", "message": message}),
        sse_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        sse_event("ping", '{"type": "ping"}'),
        *(sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}) for t in texts),
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]  # fmt: skip
    if delta_usage is not None:
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        events.append(sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": delta_usage}))  # fmt: skip
        events.append(sse_event("message_stop", {"type": "message_stop"}))
    return "".join(events).replace("\n", newline).encode()


START = {"input_tokens": 25, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 4000, "output_tokens": 1, "service_tier": "standard"}  # fmt: skip
STREAM = anthropic_stream(START, {"output_tokens": 15})
STREAM_USAGE = Usage(CLAUDE, input=25, output=15, cache_creation=300, cache_read=4000)
OVERLOADED = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'


def openai_usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}  # fmt: skip
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
        usage["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0}
    return usage


CHOICE = {"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": None}, "logprobs": None, "finish_reason": "stop"}  # fmt: skip


def openai_json(usage: Any, model: Any = GPT) -> bytes:
    completion = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": model,
        "choices": [CHOICE],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
    }
    return dumps(completion).encode()


def openai_chunk(choices: list[Any], usage: Any, model: str = GPT) -> str:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1741570283, "model": model, "system_fingerprint": "fp_fc9f1d7035", "choices": choices}  # fmt: skip
    if usage is not ...:
        chunk["usage"] = usage
    return f"data: {dumps(chunk)}\n\n"


def openai_stream(
    usage: dict[str, Any] | None,
    texts: Iterable[str] = ("Hello", ", wor", "ld! ", "été ✓"),
    model: str = GPT,
    newline: str = "\n",
) -> bytes:
    """Chunks as the API sends them; ``usage`` None: the client did not ask for it.

    With ``stream_options: {"include_usage": true}`` every chunk carries
    ``"usage": null`` and one last chunk with no choices carries the usage.
    """
    marker = None if usage is not None else ...
    chunks = [
        openai_chunk([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None, "finish_reason": None}], marker, model),
        *(openai_chunk([{"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None}], marker, model) for t in texts),
        openai_chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], marker, model),
    ]  # fmt: skip
    if usage is not None:
        chunks.append(openai_chunk([], usage, model))
    chunks.append("data: [DONE]\n\n")
    return "".join(chunks).replace("\n", newline).encode()


# -- Anthropic Messages -------------------------------------------------------------------

ANTHROPIC_CASES = [
    ("JSON: input, output, both cache counts and the model",
     JSON, anthropic_json({"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000, "output_tokens": 34}),
     Usage(CLAUDE, input=12, output=34, cache_creation=100, cache_read=2000)),
    ("JSON without cache fields: cache counts unknown, not zero",
     JSON, anthropic_json({"input_tokens": 12, "output_tokens": 34}), Usage(CLAUDE, input=12, output=34)),
    ("JSON with zero counts: zero, not unknown",
     JSON, anthropic_json({"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}),
     Usage(CLAUDE, input=0, output=0, cache_creation=0, cache_read=0)),
    ("JSON with booleans and negative numbers: they do not count",
     JSON, anthropic_json({"input_tokens": True, "output_tokens": -1, "cache_creation_input_tokens": False, "cache_read_input_tokens": 7}),
     Usage(CLAUDE, cache_read=7)),
    ("JSON with floats, strings and nulls: they do not count",
     JSON, anthropic_json({"input_tokens": 1.5, "output_tokens": "3", "cache_read_input_tokens": None}), Usage(CLAUDE)),
    ("JSON with usage null: model only, usage unknown", JSON, anthropic_json(None), Usage(CLAUDE)),
    ("JSON with usage a list: usage unknown", JSON, anthropic_json([{"input_tokens": 1}]), Usage(CLAUDE)),
    ("JSON with a model that is not a string: no model",
     JSON, anthropic_json({"input_tokens": 1, "output_tokens": 2}, model=42), Usage(input=1, output=2)),
    ("JSON error body: usage unknown", JSON, OVERLOADED.encode(), Usage()),
    ("OpenAI-shaped usage is not Anthropic usage",
     JSON, openai_json(openai_usage(10, 5, 2)), Usage(GPT)),
    ("not JSON (an HTML error page): usage unknown", JSON, b"<html><body>502 Bad Gateway</body></html>", Usage()),
    ("a JSON array: usage unknown", JSON, b'[{"usage":{"input_tokens":1}}]', Usage()),
    ("invalid UTF-8: usage unknown", JSON, b'{"model":"\xff","usage":{"input_tokens":1}}', Usage()),
    ("an empty body: usage unknown", JSON, b"", Usage()),
    ("SSE as the API sends it: input and cache from message_start, output from message_delta",
     SSE, STREAM, STREAM_USAGE),
    ("SSE cut before message_delta: output is what message_start said",
     SSE, anthropic_stream(START, None), Usage(CLAUDE, input=25, output=1, cache_creation=300, cache_read=4000)),
    ("SSE cut inside message_delta: output is what message_start said",
     SSE, STREAM[: STREAM.index(b"event: message_delta") + 40], Usage(CLAUDE, input=25, output=1, cache_creation=300, cache_read=4000)),
    ("SSE with CRLF line endings: read the same",
     SSE, anthropic_stream(START, {"output_tokens": 15}, newline="\r\n"), STREAM_USAGE),
    ("SSE whose message_delta repeats input and cache counts: the later counts win",
     SSE, anthropic_stream(START, {"input_tokens": 26, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4001, "output_tokens": 15}),
     Usage(CLAUDE, input=26, output=15, cache_creation=0, cache_read=4001)),
    ("SSE with an error event mid-stream: usage so far stands",
     SSE, anthropic_stream(START, None).replace(b"event: content_block_stop", f"event: error\ndata: {OVERLOADED}\n\nevent: content_block_stop".encode()),
     Usage(CLAUDE, input=25, output=1, cache_creation=300, cache_read=4000)),
    ("SSE that is only an error event: usage unknown", SSE, sse_event("error", OVERLOADED).encode(), Usage()),
    ("SSE data without a space after the colon: read",
     SSE, b'data:{"type":"message_delta","usage":{"output_tokens":9}}\n\n', Usage(output=9)),
    ("SSE whose last event has no newline: read",
     SSE, b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}', Usage(output=9)),
    ("SSE message_start without a message object: ignored, message_delta still read",
     SSE, b'data: {"type":"message_start","message":null}\n\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n', Usage(output=9)),
    ("SSE message_start with a model that is not a string: no model",
     SSE, anthropic_stream({"input_tokens": 3, "output_tokens": 1}, {"output_tokens": 4}, model=None),
     Usage(input=3, output=4)),
    ("SSE comment and id lines carrying usage JSON: not data, ignored",
     SSE, b':    {"type":"message_delta","usage":{"output_tokens":9}}\nid:  {"type":"message_delta","usage":{"output_tokens":9}}\n', Usage()),
    ("SSE data that is a JSON array: ignored", SSE, b'data: ["message_delta",{"usage":{"output_tokens":9}}]\n', Usage()),
    ("SSE data that is broken JSON: ignored", SSE, b'data: {"type":"message_delta","usage":{"output_tokens":9}\n', Usage()),
    ("SSE usage in a text delta is not usage",
     SSE, sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": '{"type":"message_delta","usage":{"output_tokens":9}}'}}).encode(),
     Usage()),
    ("SSE in invalid UTF-8: ignored", SSE, b'data: {"type":"message_delta","x":"\xff","usage":{"output_tokens":9}}\n', Usage()),
]  # fmt: skip


# -- OpenAI chat completions --------------------------------------------------------------

OPENAI_CASES = [
    ("JSON: cached prompt tokens are cache reads, not input",
     JSON, openai_json(openai_usage(2006, 300, cached=1920)), Usage(GPT, input=86, output=300, cache_read=1920)),
    ("JSON without prompt_tokens_details: every prompt token is input, cache reads unknown",
     JSON, openai_json(openai_usage(2006, 300)), Usage(GPT, input=2006, output=300)),
    ("JSON with prompt_tokens_details null: every prompt token is input",
     JSON, openai_json({"prompt_tokens": 20, "completion_tokens": 3, "prompt_tokens_details": None}), Usage(GPT, input=20, output=3)),
    ("JSON with no cached tokens: cache reads zero",
     JSON, openai_json(openai_usage(20, 3, cached=0)), Usage(GPT, input=20, output=3, cache_read=0)),
    ("JSON claiming more cached than prompt tokens: input zero, never negative",
     JSON, openai_json(openai_usage(20, 3, cached=25)), Usage(GPT, input=0, output=3, cache_read=25)),
    ("JSON with a cached count that does not count: every prompt token is input",
     JSON, openai_json({"prompt_tokens": 20, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": -4}}),
     Usage(GPT, input=20, output=3)),
    ("JSON with completion tokens only: input unknown",
     JSON, openai_json({"completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}), Usage(GPT, output=3)),
    ("JSON with prompt tokens only: output unknown",
     JSON, openai_json({"prompt_tokens": 20}), Usage(GPT, input=20)),
    ("JSON with booleans and negative numbers: they do not count",
     JSON, openai_json({"prompt_tokens": True, "completion_tokens": -3}), Usage(GPT)),
    ("JSON with usage a list: usage unknown", JSON, openai_json([openai_usage(1, 2)]), Usage(GPT)),
    ("JSON error body: usage unknown",
     JSON, b'{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}', Usage()),
    ("Anthropic-shaped usage is not OpenAI usage",
     JSON, anthropic_json({"input_tokens": 12, "output_tokens": 34}), Usage(CLAUDE)),
    ("not JSON: usage unknown", JSON, b"upstream connect error or disconnect/reset before headers", Usage()),
    ("SSE with include_usage: usage from the last chunk, before [DONE]",
     SSE, openai_stream(openai_usage(2006, 300, cached=1920)), Usage(GPT, input=86, output=300, cache_read=1920)),
    ("SSE without include_usage: usage unknown", SSE, openai_stream(None), Usage()),
    ("SSE cut before the usage chunk: usage unknown",
     SSE, openai_stream(openai_usage(10, 5)).split(b'"choices":[]')[0], Usage()),
    ("SSE with CRLF line endings: read the same",
     SSE, openai_stream(openai_usage(2006, 300, cached=1920), newline="\r\n"), Usage(GPT, input=86, output=300, cache_read=1920)),
    ("SSE usage chunk without a model: the model seen before stays",
     SSE, openai_stream(openai_usage(10, 5)).replace(b"data: [DONE]", b'data: {"usage":{"prompt_tokens":11,"completion_tokens":6}}\n\ndata: [DONE]'),
     Usage(GPT, input=11, output=6)),
    ("SSE with spaces around the usage colon: read",
     SSE, b'data: {"model":"m","usage" :  {"prompt_tokens":4,"completion_tokens":2}}\n', Usage("m", input=4, output=2)),
    ("SSE data that is a JSON array: ignored", SSE, b'data: [{"model":"m","usage":{"prompt_tokens":4}}]\n', Usage()),
    ("SSE usage in a content delta is not usage",
     SSE, openai_chunk([{"index": 0, "delta": {"content": '"usage": {"prompt_tokens": 4}'}}], None).encode(), Usage()),
    ("SSE comment line carrying usage JSON: ignored", SSE, b':    {"usage":{"prompt_tokens":4}}\n', Usage()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("streaming", "body", "expected"), [c[1:] for c in ANTHROPIC_CASES], ids=[c[0] for c in ANTHROPIC_CASES]
)  # fmt: skip
def test_anthropic(streaming: bool, body: bytes, expected: Usage) -> None:
    assert read(ANTHROPIC, streaming, [body]) == expected
    assert read(ANTHROPIC, streaming, one_byte_chunks(body)) == expected


@pytest.mark.parametrize(
    ("streaming", "body", "expected"), [c[1:] for c in OPENAI_CASES], ids=[c[0] for c in OPENAI_CASES]
)  # fmt: skip
def test_openai(streaming: bool, body: bytes, expected: Usage) -> None:
    assert read(OPENAI, streaming, [body]) == expected
    assert read(OPENAI, streaming, one_byte_chunks(body)) == expected


def test_a_stream_is_read_as_it_comes_not_at_the_end() -> None:
    reader = UsageReader(ANTHROPIC, streaming=True)
    reader.feed(STREAM[: STREAM.index(b"event: content_block_start")])
    assert reader.usage == Usage(CLAUDE, input=25, output=1, cache_creation=300, cache_read=4000)
    reader.feed(STREAM[STREAM.index(b"event: content_block_start") :])
    assert reader.usage == STREAM_USAGE
    assert reader.finish() == STREAM_USAGE


def test_sse_with_lone_cr_line_endings_is_read_the_same() -> None:
    assert (
        read(ANTHROPIC, SSE, [anthropic_stream(START, {"output_tokens": 15}, newline="\r")])
        == STREAM_USAGE
    )


@pytest.mark.parametrize(
    ("style", "streaming", "body"),
    [
        (ANTHROPIC, JSON, b'{"usage":' + b"[" * 200_000),
        (ANTHROPIC, SSE, b'data: {"type":"message_delta","x":' + b"[" * 200_000 + b"\n"),
        (OPENAI, SSE, b'data: {"usage":{"x":' + b"[" * 200_000 + b"\n"),
    ],
    ids=["anthropic JSON", "anthropic SSE", "openai SSE"],
)
def test_a_deeply_nested_body_is_unknown_usage_not_an_exception(
    style: ErrorStyle, streaming: bool, body: bytes
) -> None:
    assert read(style, streaming, [body]) == Usage()


# -- size limits --------------------------------------------------------------------------

LIMIT_JSON = anthropic_json({"input_tokens": 12, "output_tokens": 34})
LIMIT_USAGE = Usage(CLAUDE, input=12, output=34)
MB = 1 << 20


def padded(body: bytes, size: int) -> bytes:
    return body + b" " * (size - len(body))


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [("at the limit: read", MAX_JSON_BODY, LIMIT_USAGE), ("one byte over: unknown", MAX_JSON_BODY + 1, Usage())],
)  # fmt: skip
def test_a_json_body_over_max_json_body_is_not_read(name: str, size: int, expected: Usage) -> None:
    body = padded(LIMIT_JSON, size)
    assert read(ANTHROPIC, JSON, [body]) == expected
    assert read(ANTHROPIC, JSON, split(body, range(MB, size, MB))) == expected
    assert read(ANTHROPIC, JSON, [body[:-1], body[-1:]]) == expected


def test_chunks_after_an_over_long_json_body_are_not_read() -> None:
    too_long = padded(b"", MAX_JSON_BODY + 1)
    assert read(ANTHROPIC, JSON, [too_long, LIMIT_JSON]) == Usage()
    assert read(ANTHROPIC, JSON, [LIMIT_JSON, too_long]) == Usage()


def retained(feed: Iterable[bytes], style: ErrorStyle, streaming: bool) -> int:
    """Bytes still allocated by a reader after it was fed (the chunks are built beforehand)."""
    chunks = list(feed)
    tracemalloc.start()
    try:
        reader = UsageReader(style, streaming)
        for chunk in chunks:
            reader.feed(chunk)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.finish() is not None
    return held


def test_an_over_long_json_body_is_dropped_not_held() -> None:
    chunk = b" " * MB
    held = retained([chunk] * (MAX_JSON_BODY // MB + 4), ANTHROPIC, JSON)
    assert held < MB // 4


def test_an_over_long_sse_line_is_dropped_not_held() -> None:
    chunk = b"x" * (64 << 10)
    held = retained([b"data: ", *[chunk] * (3 * MAX_SSE_LINE // len(chunk))], ANTHROPIC, SSE)
    assert held < MAX_SSE_LINE + 2 * len(chunk)


DELTA_9 = b'data: {"type":"message_delta","usage":{"output_tokens":9}}'
START_ONLY = anthropic_stream(START, None)
START_USAGE = Usage(CLAUDE, input=25, output=1, cache_creation=300, cache_read=4000)
LONG_TEXT = sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * 2 * MAX_SSE_LINE}}).encode()  # fmt: skip

SSE_LIMIT_CASES = [
    ("a usage line of exactly MAX_SSE_LINE bytes waiting for its newline: read",
     [START_ONLY, padded(DELTA_9, MAX_SSE_LINE), b"\n"], Usage(CLAUDE, input=25, output=9, cache_creation=300, cache_read=4000)),
    ("a usage line one byte over MAX_SSE_LINE waiting for its newline: skipped",
     [START_ONLY, padded(DELTA_9, MAX_SSE_LINE + 1), b"\n"], START_USAGE),
    ("an over-long text delta in 64 KiB chunks: skipped, the message_delta after it read",
     [START_ONLY, *split(LONG_TEXT, range(64 << 10, len(LONG_TEXT), 64 << 10)), DELTA_9, b"\n"],
     Usage(CLAUDE, input=25, output=9, cache_creation=300, cache_read=4000)),
    ("the tail of an over-long line is not read as an event",
     [START_ONLY, b"data: " + b"x" * MAX_SSE_LINE, DELTA_9 + b"\n", DELTA_9.replace(b"9", b"7") + b"\n"],
     Usage(CLAUDE, input=25, output=7, cache_creation=300, cache_read=4000)),
    ("the tail of an over-long line is not read at the end either",
     [START_ONLY, b"data: " + b"x" * MAX_SSE_LINE, DELTA_9], START_USAGE),
]  # fmt: skip


@pytest.mark.parametrize(
    ("chunks", "expected"), [c[1:] for c in SSE_LIMIT_CASES], ids=[c[0] for c in SSE_LIMIT_CASES]
)
def test_sse_line_limit(chunks: list[bytes], expected: Usage) -> None:
    assert read(ANTHROPIC, SSE, chunks) == expected


# -- any split reads the same -------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**7)
texts = st.lists(st.text(max_size=12), max_size=4)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[ErrorStyle, bool, bytes, Usage]:
    """A valid body of either provider, JSON or SSE, and the usage it reports."""
    style, streaming = draw(st.sampled_from(ErrorStyle)), draw(st.booleans())
    model = draw(st.sampled_from(["", "m", CLAUDE, GPT, "modèle-✓"]))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    a, b, c, d = draw(counts), draw(counts), draw(counts), draw(counts)
    if style is ANTHROPIC:
        usage = {"input_tokens": a, "cache_creation_input_tokens": c, "cache_read_input_tokens": d}
        expected = Usage(model, input=a, output=b, cache_creation=c, cache_read=d)
        if not streaming:
            return style, streaming, anthropic_json({**usage, "output_tokens": b}, model), expected
        body = anthropic_stream({**usage, "output_tokens": 1}, {"output_tokens": b}, draw(texts), model, newline)  # fmt: skip
        return style, streaming, body, expected
    cached = draw(st.none() | st.integers(min_value=0, max_value=a))
    expected = Usage(model, input=a - (cached or 0), output=b, cache_read=cached)
    if not streaming:
        return style, streaming, openai_json(openai_usage(a, b, cached), model), expected
    return style, streaming, openai_stream(openai_usage(a, b, cached), draw(texts), model, newline), expected  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(case=bodies(), data=st.data())
def test_any_split_of_a_valid_body_reads_as_the_whole(
    case: tuple[ErrorStyle, bool, bytes, Usage], data: st.DataObject
) -> None:
    style, streaming, body, expected = case
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=40))
    assert read(style, streaming, [body]) == expected
    assert read(style, streaming, split(body, cuts)) == expected
    assert read(style, streaming, one_byte_chunks(body)) == expected


# -- endpoints ----------------------------------------------------------------------------

ENDPOINT_CASES = [
    ("Anthropic messages", ANTHROPIC, "/anthropic/v1/messages", Endpoint.MESSAGES),
    ("Anthropic messages with ?beta=true", ANTHROPIC, "/anthropic/v1/messages?beta=true", Endpoint.MESSAGES),
    ("Anthropic messages with a trailing slash", ANTHROPIC, "/anthropic/v1/messages/", Endpoint.MESSAGES),
    ("a question mark inside the query does not matter", ANTHROPIC, "/v1/messages?a=1?b=/x", Endpoint.MESSAGES),
    ("count_tokens reports no usage", ANTHROPIC, "/anthropic/v1/messages/count_tokens", Endpoint.OTHER),
    ("count_tokens with ?beta=true reports no usage", ANTHROPIC, "/anthropic/v1/messages/count_tokens?beta=true", Endpoint.OTHER),
    ("Anthropic models", ANTHROPIC, "/anthropic/v1/models", Endpoint.OTHER),
    ("/messages in the query is not the path", ANTHROPIC, "/anthropic/v1/models?next=/messages", Endpoint.OTHER),
    ("only slashes are trimmed off the end: messagesX is not messages", ANTHROPIC, "/anthropic/v1/messagesX", Endpoint.OTHER),
    ("batches of messages are not messages", ANTHROPIC, "/anthropic/v1/messages/batches", Endpoint.OTHER),
    ("chat completions on an Anthropic route: not read (Anthropic shapes only)", ANTHROPIC, "/anthropic/v1/chat/completions", Endpoint.OTHER),
    ("OpenAI chat completions", OPENAI, "/openai/chat/completions", Endpoint.CHAT),
    ("OpenAI chat completions with a version and a query", OPENAI, "/openai/v1/chat/completions?x=1", Endpoint.CHAT),
    ("OpenAI chat completions with a trailing slash", OPENAI, "/openai/v1/chat/completions/", Endpoint.CHAT),
    ("messages on an OpenAI route are not messages", OPENAI, "/openai/v1/messages", Endpoint.OTHER),
    ("OpenAI models", OPENAI, "/openai/v1/models", Endpoint.OTHER),
    ("OpenAI legacy completions", OPENAI, "/openai/v1/completions", Endpoint.OTHER),
    ("stored chat completion messages", OPENAI, "/openai/v1/chat/completions/abc/messages", Endpoint.OTHER),
    ("the root", OPENAI, "/", Endpoint.OTHER),
]  # fmt: skip


@pytest.mark.parametrize(
    ("style", "path", "expected"),
    [c[1:] for c in ENDPOINT_CASES],
    ids=[c[0] for c in ENDPOINT_CASES],
)
def test_endpoint(style: ErrorStyle, path: str, expected: Endpoint) -> None:
    assert endpoint(style, path) is expected


# -- Usage --------------------------------------------------------------------------------

USAGE_CASES = [
    ("nothing reported", Usage(), False, 0, {}),
    ("every kind reported", Usage("m", input=1, output=20, cache_creation=300, cache_read=4000), True, 4321,
     {"input": 1, "output": 20, "cache_creation": 300, "cache_read": 4000}),
    ("zero output is known", Usage(output=0), True, 0, {"output": 0}),
    ("input alone is known", Usage(input=3), True, 3, {"input": 3}),
    ("cache counts alone are not known usage, but count", Usage(cache_creation=2, cache_read=5), False, 7,
     {"cache_creation": 2, "cache_read": 5}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("usage", "known", "total", "by_type"),
    [c[1:] for c in USAGE_CASES],
    ids=[c[0] for c in USAGE_CASES],
)
def test_usage(usage: Usage, known: bool, total: int, by_type: dict[str, int]) -> None:
    assert (usage.known, usage.total, usage.by_type()) == (known, total, by_type)
