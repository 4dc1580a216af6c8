"""Token usage and per-client limits through real Envoy, with API-shaped fake providers.

Usage is counted in Envoy (its Lua meter) and reaches the processor as one access-log
record per request; it is counted by route, gateway client (`(other)` for clients without
limits of their own), who paid and model; limits apply to requests on the organisation's key
only, answer 429 in the provider's shape with ``retry-after``, and never reach
the upstream.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from harness import Gateway, RecordingUpstream, credential_route, free_port
from harness.adversary import scrape, write_keys
from harness.fakeapi import REPLY_TEXT, anthropic_api, openai_api
from harness.liveops import metric_sum, poll
from harness.upstream import RecordedRequest, Reply, Responder

ALICE, BOB = "gk-alice-usage-key", "gk-bob-usage-key"
OTHERS = "(other)"  # the client label of gateway clients without limits of their own
SERVER = "sk-ant-server-usage"
OWN = "sk-ant-api03-own-usage"
OUTPUT = len(REPLY_TEXT.split())  # what the fake provider reports as output tokens
MESSAGE = {
    "model": "claude-sonnet-5-5",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def eventually(check: Callable[[], bool]) -> None:
    poll(check, bool, "reached")


def held(release: threading.Event) -> Responder:
    """The Anthropic API, but a stream waits after its first event until ``release`` is set."""

    def respond(request: RecordedRequest) -> Reply:
        reply = anthropic_api(request)
        if reply.chunks is None:
            return reply
        events = list(reply.chunks)

        def chunks() -> Iterator[bytes]:
            yield events[0]
            release.wait(20)
            yield from events[1:]

        return Reply(reply.status, headers=reply.headers, chunks=chunks())

    return respond


class Metered:
    def __init__(
        self, gateway: Gateway, metrics: int, anthropic: RecordingUpstream, release: threading.Event
    ):
        self.gateway, self.metrics, self.anthropic, self.release = (
            gateway,
            metrics,
            anthropic,
            release,
        )

    def page(self) -> str:
        return scrape(self.metrics)

    def post(self, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        with httpx.Client(base_url=self.gateway.base_url, timeout=10) as client:
            return client.post(path, json=body, headers=headers)


def start(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
    limits: dict[str, Any] | None = None,
) -> Metered:
    release = threading.Event()
    anthropic = start_upstream("anthropic-upstream", responder=held(release))
    openai = start_upstream("openai-upstream", responder=openai_api)
    write_keys(tmp_path / "keys.txt", {"alice": ALICE, "bob": BOB})
    metrics = free_port()
    routes: list[dict[str, Any]] = [
        credential_route("anthropic", anthropic.url(), prefix="/anthropic"),
        credential_route(
            "openai", openai.url() + "/v1", prefix="/openai", header="authorization",
            format="Bearer {secret}", client_credentials=["authorization"], error_style="openai",
        ),
    ]  # fmt: skip
    top: dict[str, Any] = {
        "metering": True,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "metrics": {"address": "127.0.0.1", "port": metrics},
    }
    if limits is not None:
        top["limits"] = limits
    gateway = start_gateway(routes, env={"ANTHROPIC_KEY": SERVER, "OPENAI_KEY": SERVER}, top=top)
    return Metered(gateway, metrics, anthropic, release)


@pytest.fixture
def metered(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> Metered:
    setup = start(start_gateway, start_upstream, tmp_path)
    setup.release.set()
    return setup


# -- usage -------------------------------------------------------------------------------------


def test_usage_is_counted_by_client_by_who_paid_and_by_model(metered: Metered) -> None:
    assert (
        metered.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}).status_code == 200
    )
    streamed = metered.post(
        "/anthropic/v1/messages", {**MESSAGE, "stream": True}, **{"x-api-key": ALICE}
    )
    assert "message_stop" in streamed.text
    assert metered.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": OWN}).status_code == 200
    assert (
        metered.post(
            "/anthropic/v1/messages/count_tokens", MESSAGE, **{"x-api-key": ALICE}
        ).status_code
        == 200
    )
    eventually(lambda: metric_sum(metered.page(), "gateway_usage_requests_total") >= 4)
    page = metered.page()
    requests, tokens = "gateway_usage_requests_total", "gateway_usage_tokens_total"
    assert metric_sum(page, requests, client=OTHERS, credential_source="injected", tokens="known",
                 model="claude-sonnet-5-5") == 2  # fmt: skip
    assert (
        metric_sum(page, requests, client=OTHERS, tokens="unknown", model="unknown") == 1
    )  # count_tokens
    assert metric_sum(page, requests, client="", credential_source="client", tokens="known") == 1
    assert (
        metric_sum(page, tokens, client=OTHERS, credential_source="injected", type="output")
        == 2 * OUTPUT
    )
    assert metric_sum(page, tokens, credential_source="client", type="output") == OUTPUT
    assert (
        metric_sum(page, tokens, client=OTHERS, type="input")
        == 2 * metric_sum(page, tokens, credential_source="client", type="input")
        > 0
    )


def extproc_streams(gateway: Gateway) -> int:
    """ext_proc calls Envoy opened to the processor (the decision cluster)."""
    url = f"http://127.0.0.1:{gateway.admin_port}/stats?filter=^cluster.extproc.upstream_rq_total$"
    with httpx.Client(timeout=5) as client:
        text = client.get(url).text
    return int(text.split(":")[1]) if ":" in text else 0


def test_no_processor_call_follows_a_metered_response(metered: Metered) -> None:
    """Usage is counted in Envoy: an own-key stream opens no ext_proc call at all, a
    gateway-key one only its decision; the records still arrive."""
    before = extproc_streams(metered.gateway)
    for key in (OWN, ALICE):
        streamed = metered.post("/anthropic/v1/messages", {**MESSAGE, "stream": True},
                                **{"x-api-key": key})  # fmt: skip
        assert "message_stop" in streamed.text
    assert extproc_streams(metered.gateway) - before == 1  # alice's decision
    eventually(lambda: metric_sum(metered.page(), "gateway_usage_requests_total") == 2)


def test_openai_usage_from_json_and_from_the_final_stream_chunk(metered: Metered) -> None:
    bearer = {"authorization": f"Bearer {ALICE}"}
    assert metered.post("/openai/chat/completions", CHAT, **bearer).status_code == 200
    with_usage = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    assert "[DONE]" in metered.post("/openai/chat/completions", with_usage, **bearer).text
    assert (
        "[DONE]"
        in metered.post("/openai/chat/completions", {**CHAT, "stream": True}, **bearer).text
    )
    eventually(
        lambda: metric_sum(metered.page(), "gateway_usage_requests_total", route="openai") >= 3
    )
    page = metered.page()
    assert metric_sum(page, "gateway_usage_requests_total", route="openai", tokens="known") == 2
    assert metric_sum(page, "gateway_usage_requests_total", route="openai", tokens="unknown") == 1
    assert (
        metric_sum(
            page, "gateway_usage_tokens_total", route="openai", client=OTHERS, model="gpt-4o-mini"
        )
        > 0
    )


def test_a_stream_cut_by_the_client_counts_what_was_reported_before_the_cut(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    setup = start(start_gateway, start_upstream, tmp_path)
    with socket.create_connection(("127.0.0.1", setup.gateway.listener_port), timeout=10) as conn:
        body = b'{"model":"claude-sonnet-5-5","max_tokens":16,"stream":true,"messages":[]}'
        conn.sendall(
            b"POST /anthropic/v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"x-api-key: {ALICE}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        seen = b""
        while b"message_start" not in seen:
            seen += conn.recv(65536)
    setup.release.set()
    eventually(lambda: metric_sum(setup.page(), "gateway_usage_requests_total") >= 1)
    page = setup.page()
    assert metric_sum(page, "gateway_usage_requests_total", client=OTHERS, tokens="known") == 1
    assert (
        metric_sum(page, "gateway_usage_tokens_total", client=OTHERS, type="output") == 1
    )  # from message_start
    assert metric_sum(page, "gateway_usage_tokens_total", client=OTHERS, type="input") > 0


# -- limits ------------------------------------------------------------------------------------


def assert_limited(reply: httpx.Response, kind: str = "rate_limit_error") -> None:
    assert reply.status_code == 429, reply.text
    assert int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["type"] == kind
    assert ALICE not in reply.text and SERVER not in reply.text


def test_requests_per_minute_answer_429_and_never_reach_the_upstream(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    setup = start(start_gateway, start_upstream, tmp_path, {"default": {"requests_per_minute": 2}})
    setup.release.set()
    for _ in range(2):
        assert (
            setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}).status_code == 200
        )
    assert_limited(setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}))
    assert len(setup.anthropic.requests) == 2
    # bob has his own window; a client's own key is never limited
    assert setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": BOB}).status_code == 200
    for _ in range(3):
        assert (
            setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": OWN}).status_code == 200
        )
    reply = setup.post("/openai/chat/completions", CHAT, authorization=f"Bearer {ALICE}")
    assert reply.status_code == 429 and reply.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_token_budget_stops_the_client_once_what_was_counted_reaches_it(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    per_request = (
        len(json.dumps([None, MESSAGE["messages"], None])) // 4 + OUTPUT
    )  # as fakeapi counts
    limits = {
        "default": {"tokens": 2 * per_request - 1, "token_window": "1h"},
        "clients": {"bob": {"tokens": None}},
    }
    setup = start(start_gateway, start_upstream, tmp_path, limits)
    setup.release.set()
    assert setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}).status_code == 200
    eventually(lambda: metric_sum(setup.page(), "gateway_usage_requests_total") >= 1)
    # one response used more than half the budget, but less than all: the next may start
    assert setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}).status_code == 200
    eventually(lambda: metric_sum(setup.page(), "gateway_usage_requests_total") >= 2)
    assert_limited(setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}))
    assert (
        setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": BOB}).status_code == 200
    )  # no limit
    assert setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": OWN}).status_code == 200


def test_concurrent_requests_are_limited_while_one_is_in_flight(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    setup = start(start_gateway, start_upstream, tmp_path, {"default": {"concurrent": 1}})
    first: list[httpx.Response] = []
    stream = threading.Thread(
        target=lambda: first.append(
            setup.post(
                "/anthropic/v1/messages", {**MESSAGE, "stream": True}, **{"x-api-key": ALICE}
            )
        )
    )
    stream.start()
    try:
        eventually(lambda: len(setup.anthropic.requests) == 1)
        assert_limited(setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}))
        assert (
            setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": OWN}).status_code == 200
        )
    finally:
        setup.release.set()
        stream.join(15)
    assert first and first[0].status_code == 200
    eventually(
        lambda: (
            setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}).status_code == 200
        )
    )


def test_a_reload_changes_a_limit_live(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    setup = start(start_gateway, start_upstream, tmp_path, {"default": {"requests_per_minute": 1}})
    setup.release.set()
    assert setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}).status_code == 200
    assert_limited(setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}))
    path = setup.gateway.config_path
    config = yaml.safe_load(path.read_text())
    config["limits"] = {
        "default": {"requests_per_minute": 1},
        "clients": {"alice": {"requests_per_minute": 100}},
    }
    path.write_text(yaml.safe_dump(config))
    eventually(
        lambda: (
            setup.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}).status_code == 200
        )
    )


def test_without_the_processor_metering_never_stops_a_request_it_would_only_observe(
    metered: Metered,
) -> None:
    """Own-key requests skip the decision; the access-log service being away must not fail
    them (it only ever receives)."""
    metered.gateway.stop_extproc()
    assert metered.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": OWN}).status_code == 200
    streamed = metered.post(
        "/anthropic/v1/messages", {**MESSAGE, "stream": True}, **{"x-api-key": OWN}
    )
    assert streamed.status_code == 200 and "message_stop" in streamed.text
    assert (
        metered.post("/anthropic/v1/messages", MESSAGE, **{"x-api-key": ALICE}).status_code == 503
    )
