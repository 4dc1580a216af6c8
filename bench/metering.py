"""CPU the processor spends per request on metering and limits, measured in-process.

Envoy's observing filter sends the processor, per metered response, the
request headers, the response headers and every body chunk; this drives the
same path the server runs for each message (protobuf parse, then
``ProcessCall.handle``) with messages shaped like Envoy's, and prints
microseconds of CPU per decision (with and without a limit check), per
metered JSON response and per SSE event. ``python bench/metering.py``
(``make bench`` runs it too).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from extproc.config.load import load_config  # noqa: E402
from extproc.config.model import METADATA_NAMESPACE  # noqa: E402
from extproc.policy.access import key_line  # noqa: E402
from extproc.policy.compiled import Policy, compile_policy  # noqa: E402
from extproc.policy.processor import ATTRIBUTES_KEY, ROUTE_ATTRIBUTE  # noqa: E402
from extproc.server.calls import ProcessCall, Services  # noqa: E402
from extproc.server.metrics import Metrics  # noqa: E402
from extproc.usage.limiter import Limiter  # noqa: E402
from extproc.usage.store import MemoryStore  # noqa: E402

KEY = "gk-bench-metering-key"
CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
access: {keys_file: keys.txt}
metering: true
limits: {default: {requests_per_minute: 100000000, tokens: 100000000000, concurrent: 1000000}}
routes:
  - name: anthropic
    prefix: /anthropic
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
"""
EVENTS = 200  # content_block_delta events in the streamed response


class Source:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy


def _headers(pairs: list[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
    )


def _attributes(route: str) -> dict[str, struct_pb2.Struct]:
    attributes = struct_pb2.Struct()
    attributes.update({ROUTE_ATTRIBUTE: route})
    return {ATTRIBUTES_KEY: attributes}


def decision(route: str) -> bytes:
    request = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=_headers([("x-api-key", KEY)])),
        attributes=_attributes(route),
    )
    return request.SerializeToString()


def observed(route: str, content_type: str, chunks: list[bytes]) -> list[bytes]:
    """The messages of one observed response, as Envoy's observing filter sends them."""
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[METADATA_NAMESPACE].update(
        {"credential_source": "injected", "client": "bench", "outcome": "injected"}
    )
    path = [(":path", "/anthropic/v1/messages")]
    messages = [
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=_headers(path)),
            attributes=_attributes(route),
            metadata_context=metadata,
            observability_mode=True,
        ),
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(
                headers=_headers([(":status", "200"), ("content-type", content_type)])
            ),
            observability_mode=True,
        ),
    ]
    messages += [
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=chunk, end_of_stream=n == len(chunks) - 1),
            observability_mode=True,
        )
        for n, chunk in enumerate(chunks)
    ]
    return [m.SerializeToString() for m in messages]


def sse(events: int) -> list[bytes]:
    def event(name: str, data: dict[str, object]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    usage = {"input_tokens": 12, "output_tokens": 1}
    text = {"type": "text_delta", "text": "word "}
    start = {"type": "message_start", "message": {"model": "claude-sonnet-5-5", "usage": usage}}
    delta = {"type": "content_block_delta", "index": 0, "delta": text}
    end = {"type": "message_delta", "usage": {"output_tokens": events}}
    return [
        event("message_start", start),
        *[event("content_block_delta", delta)] * events,
        event("message_delta", end),
        event("message_stop", {"type": "message_stop"}),
    ]


def per_call(run: Callable[[], None], repeat: int) -> float:
    """Microseconds of process CPU per ``run()``, best of five rounds."""
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(repeat):
            run()
        best = min(best, (time.process_time() - start) / repeat * 1e6)
    return best


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "keys.txt").write_text(key_line("bench", KEY) + "\n")
        (Path(folder) / "gateway.yaml").write_text(CONFIG)
        config = load_config(Path(folder) / "gateway.yaml")
        policy = compile_policy(config, {"SERVER": "sk-bench-server"})
    route = config.routes[0].envoy_name
    source, metrics = Source(policy), Metrics()
    plain = Services(source, metrics)
    limited = Services(source, metrics, Limiter(MemoryStore()))
    parse = pb.ProcessingRequest.FromString

    def call(services: Services, messages: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            handler = ProcessCall(services)
            for message in messages:
                handler.handle(parse(message))
            handler.end()

        return run

    content = [{"type": "text", "text": "hi " * 200}]
    usage = {"input_tokens": 12, "output_tokens": 200}
    body = json.dumps({"model": "claude-sonnet-5-5", "content": content, "usage": usage}).encode()
    json_response = observed(route, "application/json", [body])
    short_stream = observed(route, "text/event-stream", sse(0))
    long_stream = observed(route, "text/event-stream", sse(EVENTS))
    rows = [
        ("decision, gateway key, no limits", per_call(call(plain, [decision(route)]), 20000)),
        (
            "decision, gateway key, limits checked",
            per_call(call(limited, [decision(route)]), 20000),
        ),
        ("metered JSON response (4 messages)", per_call(call(limited, json_response), 5000)),
        ("metered SSE response, 2 events", per_call(call(limited, short_stream), 5000)),
        (f"metered SSE response, {EVENTS + 2} events", per_call(call(limited, long_stream), 200)),
    ]
    per_event = (rows[4][1] - rows[3][1]) / EVENTS
    print("| processor CPU, in-process | µs |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")
    print(f"| per SSE event (one body chunk each) | {per_event:.1f} |")
    print(f"| limit check (difference) | {rows[1][1] - rows[0][1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
