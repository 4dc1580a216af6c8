"""One ProcessCall driven directly, without a server: a decision call or an observed call.

The decision filter sends one request-headers message and waits for the
answer; the observing filter (``observability_mode``) sends request headers,
response headers and body, and waits for nothing. A call tells them apart by
its messages, counts decisions in the metrics and reports usage at its end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.messages import FixedPolicy, header_map, headers_request

from extproc.config.load import load_config
from extproc.config.model import METADATA_NAMESPACE, Limit, StoreFailure
from extproc.policy.access import key_line
from extproc.policy.compiled import compile_policy
from extproc.policy.decision import Outcome
from extproc.policy.limits import Refusal
from extproc.server.calls import ProcessCall, Services
from extproc.server.metrics import Metrics

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
metering: true
access: {keys_file: keys.txt}
limits:
  default: {tokens: 1000, token_window: 1h, concurrent: 4}
routes:
  - name: anthropic
    prefix: /anthropic
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
"""
CLAUDE = "claude-sonnet-4-5-20250929"
REPLY = {"type": "message", "model": CLAUDE, "content": [],
         "usage": {"input_tokens": 12, "output_tokens": 30}}  # fmt: skip
LIMIT = Limit(tokens=1000, token_window_s=3600, concurrent=4)


class FakeLimiter:
    """Admission and Charges: refuses the clients in ``refuse``, records every call."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.calls: list[tuple[Any, ...]] = []

    def admit(self, client: str, limit: Limit, on_store_error: StoreFailure) -> Refusal | None:
        self.calls.append(("admit", client))
        if client in self.refuse:
            return Refusal(429, "concurrent", 1, f"Client '{client}' has too many in flight.")
        return None

    def started(self, client: str) -> None:
        self.calls.append(("started", client))

    def finished(self, client: str) -> None:
        self.calls.append(("finished", client))

    def charge(self, client: str, limit: Limit, tokens: int) -> None:
        self.calls.append(("charge", client, limit, tokens))


@pytest.fixture
def world(tmp_path: Path) -> tuple[FixedPolicy, str]:
    """The policy (gateway keys gk-alice and gk-bob) and the route's Envoy name."""
    keys = [key_line("alice", "gk-alice"), key_line("bob", "gk-bob")]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    (tmp_path / "gateway.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "gateway.yaml")
    policy = compile_policy(config, {"SERVER": "sk-server"})
    return FixedPolicy(policy), config.routes[0].envoy_name


def decision_request(route: str, key: bytes) -> pb.ProcessingRequest:
    return headers_request(route, [(":path", b"/anthropic/v1/messages"), ("x-api-key", key)])


def observed(route: str, client: str) -> list[pb.ProcessingRequest]:
    """A whole observed exchange for ``client`` who spent the server key: a 200 JSON reply."""
    first = headers_request(route, [(":path", b"/anthropic/v1/messages")])
    first.observability_mode = True
    first.metadata_context.filter_metadata[METADATA_NAMESPACE].update(
        {"route": "anthropic", "credential_source": "injected", "client": client}
    )
    headers = header_map([(":status", b"200"), ("content-type", b"application/json")])
    return [
        first,
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(headers=headers), observability_mode=True
        ),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=json.dumps(REPLY).encode(), end_of_stream=True),
            observability_mode=True,
        ),
    ]


def decisions(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    [family] = metrics.decisions.collect()
    return {
        (s.labels["route"], s.labels["outcome"], s.labels["client"]): s.value
        for s in family.samples
        if s.name.endswith("_total")
    }


def latency(metrics: Metrics) -> tuple[float, float]:
    """(count, sum) of the processing-time histogram."""
    [family] = metrics.processing_seconds.collect()
    values = {s.name: s.value for s in family.samples}
    return values["gateway_processing_seconds_count"], values["gateway_processing_seconds_sum"]


def usage_requests(metrics: Metrics) -> dict[tuple[str, ...], float]:
    [family] = metrics.usage_requests.collect()
    return {tuple(s.labels.values()): s.value for s in family.samples if s.name.endswith("_total")}


DECIDED = [
    ("a gateway key gets the server key and counts as injected for its client",
     b"gk-alice", frozenset(), Outcome.INJECTED, "alice"),
    ("a client's own key passes and counts as client_api_key",
     b"sk-ant-api03-own", frozenset(), Outcome.CLIENT_API_KEY, ""),
    ("a client over its limit is refused by the call's limiter, not let through",
     b"gk-bob", frozenset({"bob"}), Outcome.LIMITED, "bob"),
    ("a mistyped gateway key is denied",
     b"gk-nobody", frozenset(), Outcome.DENIED, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "refuse", "outcome", "client"), [d[1:] for d in DECIDED], ids=[d[0] for d in DECIDED]
)
def test_a_decision_call_answers_and_counts_its_outcome_once(
    world: tuple[FixedPolicy, str],
    key: bytes,
    refuse: frozenset[str],
    outcome: Outcome,
    client: str,
) -> None:
    source, route = world
    metrics, limiter = Metrics(), FakeLimiter(refuse)
    call = ProcessCall(Services(source, metrics, limiter))  # type: ignore[arg-type]
    answer = call.handle(decision_request(route, key))
    assert answer is not None
    assert (answer.route, answer.outcome, answer.client) == ("anthropic", outcome, client)
    assert decisions(metrics) == {("anthropic", outcome.value, client): 1.0}
    count, seconds = latency(metrics)
    assert count == 1 and 0 <= seconds < 1.0  # the time the decision took, not a clock reading
    call.end()
    assert limiter.calls == ([("admit", client)] if client else [])


def test_a_message_of_another_phase_is_answered_but_not_counted(
    world: tuple[FixedPolicy, str],
) -> None:
    source, _ = world
    metrics = Metrics()
    call = ProcessCall(Services(source, metrics))
    answer = call.handle(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    assert answer is not None and answer.outcome is None and not answer.final
    assert pb.ProcessingResponse.FromString(answer.payload).HasField("request_trailers")
    assert decisions(metrics) == {}
    assert latency(metrics) == (0.0, 0.0)


def test_an_observed_call_answers_nothing_and_reports_its_usage_at_the_end(
    world: tuple[FixedPolicy, str],
) -> None:
    source, route = world
    metrics, limiter = Metrics(), FakeLimiter()
    call = ProcessCall(Services(source, metrics, limiter))  # type: ignore[arg-type]
    assert [call.handle(message) for message in observed(route, "alice")] == [None, None, None]
    assert usage_requests(metrics) == {}  # nothing before the end
    assert limiter.calls == [("started", "alice")]  # in flight from the request headers
    call.end()
    assert usage_requests(metrics) == {("anthropic", "alice", "injected", CLAUDE, "known"): 1.0}
    assert limiter.calls == [
        ("started", "alice"),
        ("finished", "alice"),
        ("charge", "alice", LIMIT, 42),
    ]
    assert decisions(metrics) == {} and latency(metrics) == (0.0, 0.0)  # observing decides nothing


def test_an_observed_call_ended_twice_reports_once(world: tuple[FixedPolicy, str]) -> None:
    source, route = world
    metrics = Metrics()
    call = ProcessCall(Services(source, metrics))
    for message in observed(route, "alice"):
        call.handle(message)
    call.end()
    call.end()
    assert usage_requests(metrics) == {("anthropic", "alice", "injected", CLAUDE, "known"): 1.0}


def test_a_decision_call_ends_without_reporting_usage(world: tuple[FixedPolicy, str]) -> None:
    source, route = world
    metrics = Metrics()
    call = ProcessCall(Services(source, metrics))
    call.handle(decision_request(route, b"gk-alice"))
    call.end()
    assert usage_requests(metrics) == {}


def test_a_call_that_ends_before_any_message_reports_nothing(
    world: tuple[FixedPolicy, str],
) -> None:
    source, _ = world
    metrics = Metrics()
    ProcessCall(Services(source, metrics)).end()
    assert usage_requests(metrics) == {} and decisions(metrics) == {}
