"""A person from the SSO spends like a gateway-key client: ledger rows and metrics on their
name and teams, and their team's budget refuses them, through real Envoy, a real OpenID
provider and priced Anthropic-shaped answers."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Gateway, RecordingUpstream, credential_route, free_port
from harness.adversary import scrape, write_keys
from harness.liveops import metric_sum, poll
from harness.oidc import OpenIdProvider, Person
from test_live_spend_e2e import COST_NANO, MODEL, respond

pytestmark = pytest.mark.slow  # real Envoy, processor and OpenID provider

AUDIENCE = "https://gateway.test"
BOT = "gk-ci-bot-sso-spend-key"


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[OpenIdProvider]:
    oidc = OpenIdProvider(tmp_path, [Person("alice-cli", "alice@example.com", ("ml",))]).start()
    try:
        yield oidc
    finally:
        oidc.stop()


def _ledger(path: Path) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT client, teams, paid_by, cost_nano FROM ledger ORDER BY id"
        ).fetchall()


def test_a_persons_spend_lands_on_their_name_and_team_and_the_team_budget_refuses(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    provider: OpenIdProvider,
    tmp_path: Path,
) -> None:
    upstream = start_upstream("anthropic-upstream", responder=respond)
    write_keys(tmp_path / "keys.txt", {"ci-bot": BOT})
    metrics = free_port()
    top = {
        "metering": True,
        "metering_flush_ms": 50,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "metrics": {"address": "127.0.0.1", "port": metrics},
        "sso": {"issuer": provider.issuer, "audiences": [AUDIENCE]},
        "spend": {
            "timezone": "UTC", "state_dir": str(tmp_path / "state"), "flush_ms": 100,
            "reservation_usd": 0.01, "budgets": {"teams": {"ml": {"day": 0.20}}},
        },
    }  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": "sk-ant-server-sso"}, top=top)
    token = provider.token("alice-cli", AUDIENCE)
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    ledger = tmp_path / "state" / "spend.db"

    def post(key: str) -> httpx.Response:
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            return client.post("/anthropic/v1/messages", json=body, headers={"x-api-key": key})

    assert post(token).status_code == 200
    assert post(BOT).status_code == 200  # a machine's key beside people's tokens
    rows = poll(lambda: _ledger(ledger), lambda r: len(r) == 2, "ledger rows")
    assert sorted(rows) == [
        ("alice@example.com", "ml", "injected", COST_NANO),
        ("ci-bot", "", "injected", COST_NANO),
    ]
    page = scrape(metrics)
    assert metric_sum(page, "gateway_spend_usd_total", team="ml") == pytest.approx(COST_NANO / 1e9)
    assert post(token).status_code == 200  # $0.116 of the team's $0.20: admitted
    poll(lambda: _ledger(ledger), lambda r: len(r) == 3, "ledger rows")
    sent = len(upstream.requests)
    refused = poll(lambda: post(token), lambda r: r.status_code == 429, "a 429")
    assert refused.json()["error"]["message"].startswith("The daily budget of team 'ml' is used up")
    assert len(upstream.requests) == sent  # never reached the provider
    assert post(BOT).status_code == 200  # not in the team: not refused
    assert token not in gateway.logs()
