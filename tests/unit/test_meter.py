"""Metering one observed stream (issue 12): ext_proc messages in, one usage report out.

The messages are built as Envoy's observing filter sends them: request
headers with the route attribute and the decision's dynamic metadata under
``credential_gateway``, then response headers and the body in chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.messages import header_map, headers_request

from extproc.config.load import load_config
from extproc.config.model import METADATA_NAMESPACE, Limit
from extproc.policy.access import key_line
from extproc.policy.compiled import Policy, compile_policy
from extproc.usage.meter import MeterStream
from extproc.usage.parse import Usage

CLAUDE, GPT = "claude-sonnet-4-5-20250929", "gpt-4o-2024-08-06"
LIMITS = """\
limits:
  default: {tokens: 1000, token_window: 1h, concurrent: 4}
  clients:
    big: {tokens: 5000}
    chatty: {tokens: null}
    many: {concurrent: null}
"""
CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
metering: true
access: {keys_file: keys.txt}
LIMITS
routes:
  - name: anthropic
    prefix: /anthropic
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: openai
    prefix: /openai
    upstream: https://api.openai.com/v1
    error_style: openai
    credential: {header: authorization, format: "Bearer {secret}", secret: {env: SERVER}}
"""
ANTHROPIC_JSON = {"type": "message", "model": CLAUDE, "content": [{"type": "text", "text": "Hi"}],
                  "usage": {"input_tokens": 12, "output_tokens": 30, "cache_creation_input_tokens": 4,
                            "cache_read_input_tokens": 100}}  # fmt: skip
CLAUDE_USAGE = Usage(CLAUDE, input=12, output=30, cache_creation=4, cache_read=100)


def policy_of(folder: Path, limits: str = LIMITS) -> tuple[Policy, dict[str, str]]:
    (folder / "keys.txt").write_text(key_line("alice", "gk-alice") + "\n")
    (folder / "gateway.yaml").write_text(CONFIG.replace("LIMITS\n", limits))
    config = load_config(folder / "gateway.yaml")
    names = {route.name: route.envoy_name for route in config.routes}
    return compile_policy(config, {"SERVER": "sk-server"}), names


@pytest.fixture
def limited(tmp_path: Path) -> tuple[Policy, dict[str, str]]:
    return policy_of(tmp_path)


class Recorder:
    """Both the UsageSink and the Charges: every call, in order."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str, str, str, Usage]] = []
        self.charges: list[tuple[Any, ...]] = []

    def usage(self, route: str, client: str, source: str, model: str, usage: Usage) -> None:
        self.reports.append((route, client, source, model, usage))

    def started(self, client: str) -> None:
        self.charges.append(("started", client))

    def finished(self, client: str) -> None:
        self.charges.append(("finished", client))

    def charge(self, client: str, limit: Limit, tokens: int) -> None:
        self.charges.append(("charge", client, limit, tokens))


def request(route: str, path: str, decision: dict[str, str] | None) -> pb.ProcessingRequest:
    """Request headers as the observing filter sends them (``decision``: the dynamic metadata)."""
    message = headers_request(route, [(":path", path.encode()), (":method", b"POST")])
    message.observability_mode = True
    if decision is not None:
        message.metadata_context.filter_metadata[METADATA_NAMESPACE].update(decision)
    return pb.ProcessingRequest.FromString(message.SerializeToString())


def response(status: str, content_type: str = "application/json") -> pb.ProcessingRequest:
    headers = header_map([(":status", status.encode()), ("content-type", content_type.encode())])
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=headers), observability_mode=True
    )


def body(chunk: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        response_body=pb.HttpBody(body=chunk, end_of_stream=end), observability_mode=True
    )


def injected(client: str = "alice", route: str = "anthropic") -> dict[str, str]:
    return {"route": route, "credential_source": "injected", "outcome": "injected",
            "client": client}  # fmt: skip


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def observe(
    policy: Policy,
    first: pb.ProcessingRequest,
    *,
    status: str = "200",
    content_type: str = "application/json",
    parts: Iterable[bytes] = (),
    with_charges: bool = True,
) -> Recorder:
    """One whole observed stream, ended."""
    recorder = Recorder()
    meter = MeterStream(recorder, recorder if with_charges else None)
    meter.on_message(policy, first)
    meter.on_message(policy, response(status, content_type))
    parts = list(parts)
    for n, part in enumerate(parts):
        meter.on_message(policy, body(part, end=n == len(parts) - 1))
    meter.end()
    return recorder


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events).encode()


ANTHROPIC_SSE = sse(
    ("message_start", {"type": "message_start", "message": {
        "type": "message", "model": CLAUDE, "usage": {"input_tokens": 25, "output_tokens": 1,
                                                     "cache_read_input_tokens": 7}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello"}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                       "usage": {"output_tokens": 15}}),
    ("message_stop", {"type": "message_stop"}),
)  # fmt: skip
OPENAI_USAGE = {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59,
                "prompt_tokens_details": {"cached_tokens": 20}}  # fmt: skip
OPENAI_JSON = {"object": "chat.completion", "model": GPT, "choices": [], "usage": OPENAI_USAGE}
OPENAI_SSE = (
    f"data: {json.dumps({'model': GPT, 'choices': [{'delta': {'content': 'Hi'}}], 'usage': None})}\n\n"
    f"data: {json.dumps({'model': GPT, 'choices': [], 'usage': OPENAI_USAGE})}\n\n"
    "data: [DONE]\n\n"
).encode()
GPT_USAGE = Usage(GPT, input=30, output=9, cache_read=20)

STREAMS = [
    ("Anthropic JSON in 7-byte chunks", "anthropic", "/anthropic/v1/messages", "application/json",
     chunks(json.dumps(ANTHROPIC_JSON).encode(), 7), CLAUDE_USAGE),
    ("Anthropic SSE cut at every 5 bytes", "anthropic", "/anthropic/v1/messages?beta=true",
     "text/event-stream; charset=utf-8", chunks(ANTHROPIC_SSE, 5),
     Usage(CLAUDE, input=25, output=15, cache_read=7)),
    ("OpenAI JSON in one chunk", "openai", "/openai/v1/chat/completions", "application/json",
     [json.dumps(OPENAI_JSON).encode()], GPT_USAGE),
    ("OpenAI SSE with include_usage", "openai", "/openai/v1/chat/completions/",
     "text/event-stream", chunks(OPENAI_SSE, 11), GPT_USAGE),
]  # fmt: skip


@pytest.mark.parametrize("stream", [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS])
def test_an_injected_request_reports_its_usage_and_charges_its_client(
    limited: tuple[Policy, dict[str, str]], stream: tuple[str, str, str, list[bytes], Usage]
) -> None:
    policy, names = limited
    route, path, content_type, parts, usage = stream
    first = request(names[route], path, injected(route=route))
    seen = observe(policy, first, content_type=content_type, parts=parts)
    assert seen.reports == [(route, "alice", "injected", usage.model, usage)]
    assert seen.charges == [
        ("started", "alice"),
        ("finished", "alice"),
        ("charge", "alice", Limit(tokens=1000, token_window_s=3600, concurrent=4), usage.total),
    ]


def test_a_client_with_an_override_is_charged_against_its_own_limit(
    limited: tuple[Policy, dict[str, str]],
) -> None:
    policy, names = limited
    first = request(names["anthropic"], "/anthropic/v1/messages", injected("big"))
    seen = observe(policy, first, parts=[json.dumps(ANTHROPIC_JSON).encode()])
    assert seen.charges[-1] == (
        "charge",
        "big",
        Limit(tokens=5000, token_window_s=3600, concurrent=4),
        146,
    )


def test_the_client_is_in_flight_from_the_request_headers_to_the_end(
    limited: tuple[Policy, dict[str, str]],
) -> None:
    policy, names = limited
    recorder = Recorder()
    meter = MeterStream(recorder, recorder)
    meter.on_message(policy, request(names["anthropic"], "/anthropic/v1/messages", injected()))
    assert recorder.charges == [("started", "alice")]
    meter.on_message(policy, response("200"))
    meter.on_message(policy, body(json.dumps(ANTHROPIC_JSON).encode(), end=True))
    assert recorder.charges == [("started", "alice")] and recorder.reports == []
    meter.end()
    meter.end()  # a reset after the end: nothing more
    assert recorder.charges == [
        ("started", "alice"),
        ("finished", "alice"),
        ("charge", "alice", Limit(tokens=1000, token_window_s=3600, concurrent=4), 146),
    ]
    assert len(recorder.reports) == 1


def test_a_stream_cut_mid_way_reports_what_was_seen(
    limited: tuple[Policy, dict[str, str]],
) -> None:
    policy, names = limited
    cut = ANTHROPIC_SSE[: ANTHROPIC_SSE.index(b"event: message_delta")]
    first = request(names["anthropic"], "/anthropic/v1/messages", injected())
    recorder = Recorder()
    meter = MeterStream(recorder, recorder)
    meter.on_message(policy, first)
    meter.on_message(policy, response("200", "text/event-stream"))
    meter.on_message(policy, body(cut))
    meter.end()  # the client went away: no end_of_stream
    usage = Usage(CLAUDE, input=25, output=1, cache_read=7)
    assert recorder.reports == [("anthropic", "alice", "injected", CLAUDE, usage)]
    assert recorder.charges[-1] == (
        "charge",
        "alice",
        Limit(tokens=1000, token_window_s=3600, concurrent=4),
        33,
    )


UNKNOWN = [
    ("a 429 from the provider", "anthropic", "/anthropic/v1/messages", "429"),
    ("a 500 from the provider", "openai", "/openai/v1/chat/completions", "500"),
    ("a 201", "anthropic", "/anthropic/v1/messages", "201"),
    ("count_tokens", "anthropic", "/anthropic/v1/messages/count_tokens", "200"),
    ("models", "openai", "/openai/v1/models", "200"),
    ("an Anthropic path on an OpenAI route", "openai", "/openai/v1/messages", "200"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "path", "status"), [u[1:] for u in UNKNOWN], ids=[u[0] for u in UNKNOWN]
)
def test_a_response_that_is_not_a_successful_completion_has_unknown_usage(
    limited: tuple[Policy, dict[str, str]], route: str, path: str, status: str
) -> None:
    """Even with a usage-shaped body: the tokens are never guessed."""
    policy, names = limited
    parts = [json.dumps(ANTHROPIC_JSON if route == "anthropic" else OPENAI_JSON).encode()]
    first = request(names[route], path, injected(route=route))
    seen = observe(policy, first, status=status, parts=parts)
    assert seen.reports == [(route, "alice", "injected", "unknown", Usage())]
    assert seen.charges[-1] == (
        "charge",
        "alice",
        Limit(tokens=1000, token_window_s=3600, concurrent=4),
        0,
    )


@pytest.mark.parametrize(
    "route",
    ["", "anthropic-00000000", "not-a-route"],
    ids=["no route attribute", "a route of another config", "a made-up name"],
)
def test_an_unknown_route_reports_nothing(
    limited: tuple[Policy, dict[str, str]], route: str
) -> None:
    policy, _ = limited
    first = request(route, "/anthropic/v1/messages", injected())
    seen = observe(policy, first, parts=[json.dumps(ANTHROPIC_JSON).encode()])
    assert (seen.reports, seen.charges) == ([], [])


def test_the_fast_path_counts_as_paid_by_the_client(
    limited: tuple[Policy, dict[str, str]],
) -> None:
    """Envoy routed a client's own credential past the decision: no decision metadata."""
    policy, names = limited
    first = request(names["anthropic"], "/anthropic/v1/messages", None)
    seen = observe(policy, first, parts=[json.dumps(ANTHROPIC_JSON).encode()])
    assert seen.reports == [("anthropic", "", "client", CLAUDE, CLAUDE_USAGE)]
    assert seen.charges == []


NOT_CHARGED = [
    ("client-paid with a gateway key",
     {"credential_source": "client", "outcome": "client_api_key", "client": "alice"}, "client"),
    ("injected for no client", {"credential_source": "injected", "outcome": "injected"}, "injected"),
    ("limited", {"credential_source": "none", "outcome": "limited", "client": "alice"}, "none"),
    ("denied", {"credential_source": "none", "outcome": "denied"}, "none"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("decision", "source"), [n[1:] for n in NOT_CHARGED], ids=[n[0] for n in NOT_CHARGED]
)
def test_only_the_organisations_key_spent_by_a_client_is_charged(
    limited: tuple[Policy, dict[str, str]], decision: dict[str, str], source: str
) -> None:
    policy, names = limited
    first = request(
        names["anthropic"], "/anthropic/v1/messages", {"route": "anthropic", **decision}
    )
    seen = observe(policy, first, parts=[json.dumps(ANTHROPIC_JSON).encode()])
    assert seen.reports == [("anthropic", decision.get("client", ""), source, CLAUDE, CLAUDE_USAGE)]
    assert seen.charges == []


@pytest.mark.parametrize(
    ("client", "expected"),
    [("chatty", ["started", "finished"]), ("many", ["charge"])],
    ids=["no token limit: in flight counted, tokens not", "no concurrency limit: tokens only"],
)
def test_only_what_a_clients_limits_read_is_counted(
    limited: tuple[Policy, dict[str, str]], client: str, expected: list[str]
) -> None:
    policy, names = limited
    first = request(names["anthropic"], "/anthropic/v1/messages", injected(client))
    seen = observe(policy, first, parts=[json.dumps(ANTHROPIC_JSON).encode()])
    assert [charge[0] for charge in seen.charges] == expected


def test_without_a_limit_table_nothing_is_charged(tmp_path: Path) -> None:
    policy, names = policy_of(tmp_path, limits="")
    assert policy.limits is None
    first = request(names["anthropic"], "/anthropic/v1/messages", injected())
    seen = observe(policy, first, parts=[json.dumps(ANTHROPIC_JSON).encode()])
    assert seen.reports == [("anthropic", "alice", "injected", CLAUDE, CLAUDE_USAGE)]
    assert seen.charges == []


def test_without_charges_usage_is_still_reported(limited: tuple[Policy, dict[str, str]]) -> None:
    policy, names = limited
    first = request(names["anthropic"], "/anthropic/v1/messages", injected())
    seen = observe(policy, first, parts=[json.dumps(ANTHROPIC_JSON).encode()], with_charges=False)
    assert seen.reports == [("anthropic", "alice", "injected", CLAUDE, CLAUDE_USAGE)]


@pytest.mark.parametrize(
    ("model", "label"),
    [
        (CLAUDE, CLAUDE),
        ("ft:gpt-4o-mini:my-org@custom/v1.2_x", "ft:gpt-4o-mini:my-org@custom/v1.2_x"),
        ("m" * 80, "m" * 80),
        ("m" * 81, "other"),
        ("claude 3", "other"),
        ("claude\n3", "other"),
        ('claude"},{"x', "other"),
        ("modèle", "other"),
        ("", "unknown"),
        (None, "unknown"),
        (42, "unknown"),
    ],
    ids=["a real model", "every allowed character", "80 characters", "81 characters", "a space",
         "a newline", "quotes and braces", "non-ASCII", "empty", "null", "a number"],
)  # fmt: skip
def test_the_model_label_is_bounded(
    limited: tuple[Policy, dict[str, str]], model: object, label: str
) -> None:
    policy, names = limited
    document = {**ANTHROPIC_JSON, "model": model}
    first = request(names["anthropic"], "/anthropic/v1/messages", injected())
    seen = observe(policy, first, parts=[json.dumps(document).encode()])
    [(_, _, _, reported, usage)] = seen.reports
    assert reported == label
    assert usage.total == 146  # the tokens count whatever the model is called


def test_messages_out_of_order_are_ignored(limited: tuple[Policy, dict[str, str]]) -> None:
    """A body before response headers, or response headers for an unknown route, read nothing."""
    policy, names = limited
    recorder = Recorder()
    meter = MeterStream(recorder, recorder)
    meter.on_message(policy, response("200"))  # before any request headers: no route yet
    meter.on_message(policy, request(names["anthropic"], "/anthropic/v1/messages", injected()))
    meter.on_message(policy, body(json.dumps(ANTHROPIC_JSON).encode()))  # no reader yet
    meter.on_message(policy, pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    meter.end()
    assert recorder.reports == [("anthropic", "alice", "injected", "unknown", Usage())]
