"""Every answer the gateway gives itself, through real Envoy, as the provider's own SDK reads it.

On an Anthropic route and an OpenAI route: the processor down and too slow, the upstream
unreachable, a client over its limit, the limits store down with ``on_store_error:
closed``, and a path under no route. Each answer must parse in the route's provider shape
(the real ``anthropic`` and ``openai`` SDKs read it) with a message a person can act on,
never Envoy's internal text (``ext_proc_error_gRPC_error_14{…}``). The access log says who
paid on the fast path too, and a request with no credential at all has its own outcome.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import anthropic
import httpx
import openai
import pytest
from harness import Gateway, RecordingUpstream, credential_route, free_port, raw_request
from harness.adversary import write_keys
from harness.liveops import poll
from harness.redis import RedisServer

ALICE = "gk-alice-errors-e2e-key"  # limits of her own: 1 request a minute
BOB = "gk-bob-errors-e2e-key"  # the default limit, generous
OWN = "sk-ant-api03-own-errors-e2e"
SERVER = "sk-server-errors-e2e"
INTERNAL = ("ext_proc", "gRPC", "upstream_reset", "credential_gateway_", "{", "_error_")

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


class SdkError(NamedTuple):
    status: int
    kind: str  # Anthropic's error.type, OpenAI's error.code
    message: str


def anthropic_error(gateway: Gateway, prefix: str, key: str) -> SdkError:
    """What Anthropic's SDK raises for a Messages call through ``prefix`` with ``key``."""
    client = anthropic.Anthropic(
        base_url=gateway.url(prefix), api_key=key, max_retries=0, timeout=30
    )
    with pytest.raises(anthropic.APIStatusError) as raised:
        client.messages.create(
            model="claude-sonnet-5-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    error = body["error"]
    return SdkError(raised.value.status_code, error["type"], error["message"])


def openai_error(gateway: Gateway, prefix: str, key: str) -> SdkError:
    """What OpenAI's SDK raises for a chat completion through ``prefix`` with ``key``."""
    client = openai.OpenAI(base_url=gateway.url(prefix), api_key=key, max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    error = raised.value
    assert isinstance(error.body, dict) and set(error.body) >= {"message", "type", "code"}
    assert error.code is not None and error.type is not None
    return SdkError(error.status_code, error.code, error.body["message"])


def readable(message: str) -> bool:
    """A sentence for a person, not Envoy's internal detail."""
    return len(message) > 20 and " " in message and not any(w in message for w in INTERNAL)


def routes(upstream: str, gone: str) -> list[dict[str, Any]]:
    """An Anthropic and an OpenAI route to ``upstream``, and the same pair to ``gone``."""

    def openai_route(name: str, url: str) -> dict[str, Any]:
        return credential_route(name, url, {"env": "SERVER_KEY"}, header="authorization",
                                format="Bearer {secret}", client_credentials=["authorization"],
                                error_style="openai")  # fmt: skip

    return [
        credential_route("anthropic", upstream, {"env": "SERVER_KEY"}),
        openai_route("openai", upstream),
        credential_route("anthropic-gone", gone, {"env": "SERVER_KEY"}),
        openai_route("openai-gone", gone),
    ]


def limits(store: str) -> dict[str, Any]:
    return {
        "store": store,
        "sync_ms": 100,
        "on_store_error": "closed",
        "default": {"requests_per_minute": 10_000},
        "clients": {"alice": {"requests_per_minute": 1}},
    }


@pytest.fixture
def keyed(
    start_gateway: Callable[..., Gateway], tmp_path: Path
) -> Callable[..., tuple[Gateway, RecordingUpstream]]:
    """``keyed(store="memory", **options)``: a gateway with keys and limits before one upstream."""
    upstreams: list[RecordingUpstream] = []

    def start(store: str = "memory", **options: Any) -> tuple[Gateway, RecordingUpstream]:
        write_keys(tmp_path / "keys.txt", {"alice": ALICE, "bob": BOB})
        upstream = RecordingUpstream("errors-upstream").start()
        upstreams.append(upstream)
        top = {"access": {"keys_file": str(tmp_path / "keys.txt")}, "limits": limits(store)}
        gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        gateway = start_gateway(
            routes(upstream.url(), gone), env={"SERVER_KEY": SERVER}, top=top, **options
        )
        return gateway, upstream

    yield start
    for upstream in upstreams:
        upstream.stop()


def test_an_unreachable_upstream_is_a_503_in_each_routes_shape(
    keyed: Callable[..., tuple[Gateway, RecordingUpstream]],
) -> None:
    gateway, _ = keyed()
    for error in (anthropic_error(gateway, "/anthropic-gone", BOB),
                  anthropic_error(gateway, "/anthropic-gone", OWN)):  # fmt: skip
        assert (error.status, error.kind) == (503, "overloaded_error")
        assert readable(error.message) and "provider" in error.message, error
    error = openai_error(gateway, "/openai-gone/v1", BOB)
    assert (error.status, error.kind) == (503, "service_unavailable")
    assert readable(error.message) and "provider" in error.message, error


def test_a_limited_client_gets_a_429_in_each_routes_shape(
    keyed: Callable[..., tuple[Gateway, RecordingUpstream]],
) -> None:
    gateway, upstream = keyed()
    assert status(gateway, ALICE) == 200
    limited = [
        anthropic_error(gateway, "/anthropic", ALICE),
        openai_error(gateway, "/openai/v1", ALICE),
    ]
    assert [(e.status, e.kind) for e in limited] == [(429, "rate_limit_error"), (429, "rate_limit_exceeded")]  # fmt: skip
    assert all(readable(e.message) and "alice" in e.message for e in limited), limited
    assert len(upstream.requests) == 1
    reply = raw_request(
        gateway.listener_port, "/openai/v1/models", [("authorization", f"Bearer {ALICE}")]
    )
    assert (reply.status, reply.header("content-type")) == (429, b"application/json")  # fmt: skip


def test_the_limits_store_down_fails_closed_in_each_routes_shape(
    keyed: Callable[..., tuple[Gateway, RecordingUpstream]], tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        gateway, _ = keyed(store=redis.url)
        assert status(gateway, BOB) == 200
        redis.stop()
        poll(lambda: status(gateway, BOB), lambda code: code == 503, "the store's 503")
        refused = anthropic_error(gateway, "/anthropic", BOB)
    assert refused.kind == "overloaded_error" and readable(refused.message), refused
    error = openai_error(gateway, "/openai/v1", BOB)
    assert (error.status, error.kind) == (503, "service_unavailable")
    assert error.message == refused.message  # the processor's own words, in OpenAI's shape


def status(gateway: Gateway, key: str) -> int:
    with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
        return client.get("/anthropic/v1/models", headers={"x-api-key": key}).status_code


@contextmanager
def silent_listener(port: int) -> Iterator[None]:
    """Something on ``port`` that accepts connections and never answers (a stuck processor)."""
    server = socket.create_server(("127.0.0.1", port))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_the_processor_down_or_too_slow_is_a_5xx_in_each_routes_shape(
    keyed: Callable[..., tuple[Gateway, RecordingUpstream]],
) -> None:
    gateway, upstream = keyed(extproc={"timeout_ms": 1000})
    gateway.stop_extproc()
    down = [anthropic_error(gateway, "/anthropic", BOB), openai_error(gateway, "/openai/v1", BOB)]
    assert [(e.status, e.kind) for e in down] == [(503, "api_error"), (503, "server_error")]  # fmt: skip
    with silent_listener(gateway.extproc_port):
        slow = [
            anthropic_error(gateway, "/anthropic", BOB),
            openai_error(gateway, "/openai/v1", BOB),
        ]
    assert [(e.status, e.kind) for e in slow] == [(504, "api_error"), (504, "server_error")]  # fmt: skip
    for error in down + slow:
        assert readable(error.message) and "processor" in error.message, error
    assert upstream.requests == []


def test_a_path_under_no_route_is_a_404_both_sdks_read(
    keyed: Callable[..., tuple[Gateway, RecordingUpstream]],
) -> None:
    gateway, _ = keyed()
    assert anthropic_error(gateway, "/nowhere", BOB).kind == "not_found_error"
    error = openai_error(gateway, "/nowhere/v1", BOB)
    assert (error.status, error.kind) == (404, "unknown_url") and readable(error.message)


def test_the_access_log_says_who_paid_and_tells_no_credential_from_a_bad_key(
    keyed: Callable[..., tuple[Gateway, RecordingUpstream]],
) -> None:
    gateway, _ = keyed()
    sent = {  # name: (method, path, headers); the path tells the lines apart
        "fast": ("GET", "/anthropic/v1/fast", [("x-api-key", OWN)]),
        "hello": ("HEAD", "/anthropic/api/hello", []),  # Claude Code at every session start
        "typo": ("GET", "/anthropic/v1/typo", [("x-api-key", "gk-typo")]),
        "keyed": ("GET", "/anthropic/v1/keyed", [("x-api-key", BOB)]),
    }
    port = gateway.listener_port
    statuses = {name: raw_request(port, path, headers, method=method).status
                for name, (method, path, headers) in sent.items()}  # fmt: skip
    assert statuses == {"fast": 200, "hello": 401, "typo": 401, "keyed": 200}
    paths = {path: name for name, (_, path, _) in sent.items()}
    poll(lambda: [e for e in gateway.access_log() if e.get("path") in paths],
         lambda found: len(found) >= len(sent), "an access-log line per request")  # fmt: skip
    lines = [e for e in gateway.access_log() if e.get("path") in paths]
    assert len(lines) == len(sent), lines  # one line each, whichever logger wrote it
    by_name = {paths[e["path"]]: e for e in lines}
    seen = {name: (e["credential_source"], e["outcome"]) for name, e in by_name.items()}
    assert seen == {
        "fast": ("client", None),  # Envoy skipped the processor: the route says who paid
        "hello": ("none", "no_credential"),
        "typo": ("none", "denied"),
        "keyed": ("injected", "injected"),
    }
