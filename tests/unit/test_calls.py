"""``calls.decide`` driven directly, without a server: one Process message, one answer.

The decision filter sends one request-headers message and waits for the answer; the
decision is counted in the metrics, and a request admitted on the organisation's key for
a client with a concurrency limit is counted in flight by the limiter (its usage record, from
Envoy's access log, ends it: see test_meter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.keys import key_line
from harness.messages import FixedPolicy, headers_request

from extproc.config.load import load_config
from extproc.config.model import Limit, StoreFailure
from extproc.policy.compiled import compile_policy
from extproc.policy.decision import Outcome
from extproc.policy.limits import Refusal
from extproc.server.calls import Services, decide
from extproc.server.metrics import Metrics

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
metering: true
access: {keys_file: keys.txt}
limits:
  default: {tokens: 1000, token_window: 1h, concurrent: 4}
  clients: {alice: {concurrent: 4}, bob: {concurrent: 4}}  # their own series in the metrics
routes:
  - name: anthropic
    prefix: /anthropic
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
"""


class FakeLimiter:
    """Admission and Charges: refuses the clients in ``refuse``, records every call."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.calls: list[tuple[Any, ...]] = []

    def admit(
        self, client: str, limit: Limit, on_store_error: StoreFailure, *budgets: object
    ) -> Refusal | None:  # (no budgets in these tests)
        self.calls.append(("admit", client))
        if client in self.refuse:
            return Refusal(429, "concurrent", 1, f"Client '{client}' has too many in flight.")
        return None

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
    answer = decide(Services(source, metrics, limiter), decision_request(route, key))  # type: ignore[arg-type]
    assert (answer.route, answer.outcome, answer.client) == ("anthropic", outcome, client)
    assert decisions(metrics) == {("anthropic", outcome.value, client): 1.0}
    count, seconds = latency(metrics)
    assert count == 1 and 0 <= seconds < 1.0  # the time the decision took, not a clock reading
    assert limiter.calls == ([("admit", client)] if client else [])  # admit counts in flight


def test_a_message_of_another_phase_is_answered_but_not_counted(
    world: tuple[FixedPolicy, str],
) -> None:
    source, _ = world
    metrics = Metrics()
    answer = decide(
        Services(source, metrics), pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
    )
    assert answer.outcome is None and not answer.final
    assert pb.ProcessingResponse.FromString(answer.payload).HasField("request_trailers")
    assert decisions(metrics) == {}
    assert latency(metrics) == (0.0, 0.0)
