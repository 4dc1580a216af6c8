"""Limits and budgets are one step of the limiter: checked and counted under its lock.

server: grpcio decides on a pool of threads. A request counted in flight only after the
decision (and after the budgets) let requests decided at the same moment pass a client's
``concurrent`` limit; a request the budgets refused still used up a request of its minute.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.messages import FixedPolicy, headers_request

from extproc.config.load import load_config
from extproc.config.model import METADATA_NAMESPACE
from extproc.policy.access import KeyLine, key_digest
from extproc.policy.compiled import Policy, compile_policy
from extproc.policy.decision import Outcome
from extproc.policy.limits import Refusal
from extproc.server.calls import Services, decide
from extproc.server.metrics import Metrics
from extproc.usage.limiter import Limiter
from extproc.usage.meter import Meter
from extproc.usage.store import MemoryStore

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
metering: true
access: {keys_file: keys.txt}
limits:
  default: {concurrent: 1}
  clients: {carol: {requests_per_minute: 1, concurrent: 1}}
routes:
  - name: anthropic
    prefix: /anthropic
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
"""
OVER = Refusal(429, "budget", 60, "The daily budget of client 'alice' is used up.")


@pytest.fixture
def world(tmp_path: Path) -> tuple[Policy, str]:
    lines = [KeyLine(name, key_digest(f"gk-{name}")).text() for name in ("alice", "carol")]
    (tmp_path / "keys.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "gateway.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "gateway.yaml")
    return compile_policy(config, {"SERVER": "sk-server"}), config.routes[0].envoy_name


def request(route: str, client: str = "alice") -> pb.ProcessingRequest:
    key = f"gk-{client}".encode()
    return headers_request(route, [(":path", b"/anthropic/v1/messages"), ("x-api-key", key)])


class SecondDecidesMeanwhile:
    """Budgets that, asked for the first request, let a second request be decided first
    (or, when the limiter holds its lock, wait a second for it: it cannot start)."""

    def __init__(self, decide_second: threading.Thread) -> None:
        self.second = decide_second
        self.asked = 0

    def admit(self, client: str, teams: tuple[str, ...] = ()) -> Refusal | None:
        self.asked += 1
        if self.asked == 1:
            self.second.start()
            self.second.join(timeout=1)
        return None


def test_two_requests_decided_at_once_never_pass_the_concurrent_limit(
    world: tuple[Policy, str],
) -> None:
    policy, route = world
    limiter = Limiter(MemoryStore())
    outcomes: list[Outcome | None] = []
    second = threading.Thread(
        target=lambda: outcomes.append(decide(services, request(route)).outcome)
    )
    services = Services(
        FixedPolicy(policy), Metrics(), limiter, budgets=SecondDecidesMeanwhile(second)
    )
    outcomes.append(decide(services, request(route)).outcome)
    second.join(timeout=30)
    assert sorted(o.value for o in outcomes if o) == ["injected", "limited"]
    assert limiter.store.inflight("alice") == 1


class RefusesFirst:
    def __init__(self) -> None:
        self.asked = 0

    def admit(self, client: str, teams: tuple[str, ...] = ()) -> Refusal | None:
        self.asked += 1
        return OVER if self.asked == 1 else None


def test_a_request_the_budgets_refuse_uses_no_request_of_the_minute_nor_a_slot(
    world: tuple[Policy, str],
) -> None:
    policy, route = world
    limiter = Limiter(MemoryStore())
    services = Services(FixedPolicy(policy), Metrics(), limiter, budgets=RefusesFirst())
    assert decide(services, request(route, "carol")).outcome is Outcome.LIMITED  # the budget's 429
    assert limiter.store.inflight("carol") == 0
    assert decide(services, request(route, "carol")).outcome is Outcome.INJECTED  # 1/min: this
    assert limiter.store.inflight("carol") == 1


def finished(route: str) -> bytes:
    """Envoy's access-log entry for alice's request on the organisation's key."""
    message = als_pb2.StreamAccessLogsMessage()
    found = message.http_logs.log_entry.add()
    found.common_properties.route_name = route
    found.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].update(
        {"credential_source": "injected", "outcome": "injected", "client": "alice"}
    )
    found.response.response_code.value = 200
    return message.SerializeToString()


def test_the_record_ends_the_one_lease_the_admission_took(world: tuple[Policy, str]) -> None:
    """Counted once (by ``admit``; the call no longer counts it again): its record frees it."""
    policy, route = world
    limiter = Limiter(MemoryStore())
    services = Services(FixedPolicy(policy), Metrics(), limiter)
    assert decide(services, request(route)).outcome is Outcome.INJECTED
    assert limiter.store.inflight("alice") == 1
    Meter(services.metrics, limiter).batch(policy, finished(route))
    assert limiter.store.inflight("alice") == 0
