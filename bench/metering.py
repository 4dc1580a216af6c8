"""CPU the processor spends per request on metering and limits, measured in-process.

Envoy counts the tokens itself (the Lua meter) and sends the processor one access-log
entry per finished request, in batches: whatever the response (JSON or hundreds of SSE
events), the processor reads one entry. This drives the server's paths in-process
(``calls.decide`` for a decision, ``Meter.batch`` for a batch of entries shaped like
Envoy's) and prints microseconds of CPU per decision (with and without a limit check)
and per usage record. ``python bench/metering.py`` (``make bench`` runs it too).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from extproc.config.load import load_config  # noqa: E402
from extproc.config.model import METADATA_NAMESPACE  # noqa: E402
from extproc.policy.access import KeyLine, key_digest  # noqa: E402
from extproc.policy.compiled import Policy, compile_policy  # noqa: E402
from extproc.policy.processor import ATTRIBUTES_KEY, ROUTE_ATTRIBUTE  # noqa: E402
from extproc.server.calls import Services, decide  # noqa: E402
from extproc.server.metrics import Metrics  # noqa: E402
from extproc.usage.limiter import Limiter  # noqa: E402
from extproc.usage.records import USAGE_NAMESPACE  # noqa: E402
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
BATCH = 50  # entries per access-log message (Envoy batches per flush interval)


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


def entries(route: str, count: int) -> bytes:
    """A batch of ``count`` finished, metered requests, as Envoy's gRPC access log sends it."""
    message = als_pb2.StreamAccessLogsMessage()
    for n in range(count):
        entry = message.http_logs.log_entry.add()
        common = entry.common_properties
        common.route_name = route
        common.start_time.seconds, common.duration.nanos = 1_760_000_000 + n, 12_000_000
        metadata = common.metadata.filter_metadata
        metadata[METADATA_NAMESPACE].update(
            {"credential_source": "injected", "client": "bench", "outcome": "injected"}
        )
        metadata[USAGE_NAMESPACE].update(
            {"model": "claude-sonnet-5-5", "input": 12, "output": 200, "cache_read": 100,
             "cache_5m": 4, "cache_1h": 0, "partial": False}
        )  # fmt: skip
        entry.request.request_id = f"bench-{n}"
        entry.request.request_headers["x-claude-code-session-id"] = "bench-session"
        entry.response.response_code.value = 200
    data: bytes = message.SerializeToString()
    return data


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
        (Path(folder) / "keys.txt").write_text(KeyLine("bench", key_digest(KEY)).text() + "\n")
        (Path(folder) / "gateway.yaml").write_text(CONFIG)
        config = load_config(Path(folder) / "gateway.yaml")
        policy = compile_policy(config, {"SERVER": "sk-bench-server"})
    route = config.routes[0].envoy_name
    source, metrics = Source(policy), Metrics()
    plain = Services(source, metrics)
    limited = Services(source, metrics, Limiter(MemoryStore()))
    parse = pb.ProcessingRequest.FromString

    def decide_with(services: Services) -> Callable[[], None]:
        message = decision(route)

        def run() -> None:
            decide(services, parse(message))

        return run

    batch = entries(route, BATCH)
    usage = limited.meter()
    per_batch = per_call(lambda: usage.batch(policy, batch), 500)
    rows = [
        ("decision, gateway key, no limits", per_call(decide_with(plain), 20000)),
        ("decision, gateway key, limits checked", per_call(decide_with(limited), 20000)),
        (f"usage record, in a batch of {BATCH} (metrics, limits)", per_batch / BATCH),
        ("per SSE event (no event reaches the processor)", 0.0),
    ]
    print("| processor CPU, in-process | µs |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")
    print(f"| limit check (difference) | {rows[1][1] - rows[0][1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
