"""The processor asks the budgets beside the limits: a 429 in the route's provider shape,
naming the budget and its reset, with retry-after until then; client-paid traffic never asked."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.keys import key_line
from harness.messages import headers_request

from extproc.config.load import load_config
from extproc.policy.compiled import Policy, compile_policy
from extproc.policy.decision import Outcome
from extproc.policy.processor import process
from extproc.spend.budgets import Budgets
from extproc.spend.prices import nano

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
metering: true
access: {keys_file: keys.txt}
spend:
  timezone: Europe/Berlin
  budgets:
    clients: {alice: {day: 1}}
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
NOW = datetime(2026, 12, 7, 23, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()


@pytest.fixture
def gateway(tmp_path: Path) -> tuple[Policy, dict[str, str], Budgets]:
    (tmp_path / "keys.txt").write_text(key_line("alice", "gk-alice") + "\n")
    (tmp_path / "gateway.yaml").write_text(CONFIG)
    config = load_config(tmp_path / "gateway.yaml")
    assert config.spend is not None
    names = {route.name: route.envoy_name for route in config.routes}
    budgets = Budgets(config.spend, lambda: NOW)
    return compile_policy(config, {"SERVER": "sk-server"}), names, budgets


def answer_of(payload: bytes) -> pb.ProcessingResponse:
    return pb.ProcessingResponse.FromString(payload)


def test_over_budget_is_a_429_in_the_routes_shape_with_retry_after_until_the_reset(
    gateway: tuple[Policy, dict[str, str], Budgets],
) -> None:
    policy, names, budgets = gateway
    budgets.settle("alice", (), NOW, nano(Decimal(1)))
    expected = (
        "The daily budget of client 'alice' is used up: $1.00 spent of $1.00. "
        "It resets at 2026-12-08T00:00:00+01:00."
    )
    for route, headers, body in [
        ("anthropic", [("x-api-key", b"gk-alice")],
         {"type": "error", "error": {"type": "rate_limit_error", "message": expected}}),
        ("openai", [("authorization", b"Bearer gk-alice")],
         {"error": {"message": expected, "type": "requests", "param": None, "code": "rate_limit_exceeded"}}),
    ]:  # fmt: skip
        answer = process(policy, headers_request(names[route], headers), None, budgets)
        assert answer.outcome is Outcome.LIMITED and answer.client == "alice"
        immediate = answer_of(answer.payload).immediate_response
        assert immediate.status.code == 429
        assert json.loads(immediate.body) == body
        (header,) = immediate.headers.set_headers
        assert (header.header.key, header.header.raw_value) == ("retry-after", b"3600")
        assert immediate.details == "credential_gateway_limited_budget"


def test_client_paid_traffic_is_never_checked_against_a_budget(
    gateway: tuple[Policy, dict[str, str], Budgets],
) -> None:
    policy, names, budgets = gateway
    budgets.settle("alice", (), NOW, nano(Decimal(5)))
    request = headers_request(names["anthropic"], [("x-api-key", b"sk-own")])
    answer = process(policy, request, None, budgets)
    assert answer.outcome is Outcome.CLIENT_API_KEY


def test_under_budget_the_key_is_injected_and_a_reservation_held(
    gateway: tuple[Policy, dict[str, str], Budgets],
) -> None:
    policy, names, budgets = gateway
    request = headers_request(names["anthropic"], [("x-api-key", b"gk-alice")])
    assert process(policy, request, None, budgets).outcome is Outcome.INJECTED
    (held,) = [a for a, *_ in budgets.state("alice") if a.scope == "client"]
    assert held.reserved == nano(Decimal("0.50"))


def test_a_team_budget_counts_the_teams_the_keys_file_gives_at_request_start(
    tmp_path: Path,
) -> None:
    (tmp_path / "keys.txt").write_text(key_line("carol", "gk-carol") + " teams=ml,web\n")
    text = CONFIG.replace("clients: {alice: {day: 1}}", "teams: {web: {day: 1}}")
    (tmp_path / "gateway.yaml").write_text(text)
    config = load_config(tmp_path / "gateway.yaml")
    assert config.spend is not None
    policy = compile_policy(config, {"SERVER": "sk-server"})
    budgets = Budgets(config.spend, lambda: NOW)
    budgets.settle("dave", ("web",), NOW, nano(Decimal(1)))  # another member used it up
    route = next(r.envoy_name for r in config.routes if r.name == "anthropic")
    answer = process(policy, headers_request(route, [("x-api-key", b"gk-carol")]), None, budgets)
    assert answer.outcome is Outcome.LIMITED and answer.teams == ("ml", "web")
    body = json.loads(answer_of(answer.payload).immediate_response.body)
    assert "daily budget of team 'web'" in body["error"]["message"]
