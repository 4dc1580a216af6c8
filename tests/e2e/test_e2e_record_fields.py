"""What a usage record says about who sent a request and who paid, through real Envoy.

The records come from Envoy's gRPC access log: the processor's decision metadata (the client
and its teams) and the route's (a fast-path copy names ``client`` as the payer). Team budgets
are charged from these records, so a team's cap refuses real traffic; a fast-path record says
the client paid even when no decision was made.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Gateway, RecordingUpstream, credential_route, free_port
from harness.adversary import replace_text, scrape
from harness.liveops import metric_sum, poll
from harness.upstream import RecordedRequest, Reply

from extproc.policy.access import KeyLine, key_digest

pytestmark = pytest.mark.slow  # real Envoy and processor

ALICE, BOB, CAROL = "gk-alice-teams-key", "gk-bob-teams-key", "gk-carol-teams-key"
SERVER, OWN = "sk-ant-server-teams", "sk-ant-api03-own-teams"
MODEL = "claude-opus-4-1"
# claude-opus-4-1: input $15, output $75 per million: 1000 x 15 + 200 x 75 = $0.03 a request
USAGE = {"input_tokens": 1000, "output_tokens": 200}
COST_NANO = 30_000_000
BODY = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def respond(request: RecordedRequest) -> Reply:
    if request.method == "HEAD":
        return Reply(200)
    message = {"id": "msg_t", "type": "message", "role": "assistant", "model": MODEL,
               "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
               "usage": USAGE}  # fmt: skip
    return Reply(200, json.dumps(message).encode(), headers=(("content-type", "application/json"),))


def keys_file(path: Path) -> Path:
    """alice and bob in team platform (bob also in ml), carol in none."""
    lines = [
        KeyLine("alice", key_digest(ALICE), teams=("platform",)),
        KeyLine("bob", key_digest(BOB), teams=("ml", "platform")),
        KeyLine("carol", key_digest(CAROL)),
    ]
    replace_text(path, "".join(line.text() + "\n" for line in lines))
    return path


def ledger(path: Path) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT client, teams, paid_by, cost_nano FROM ledger ORDER BY id"
        ).fetchall()


class Setup:
    def __init__(self, gateway: Gateway, metrics: int, state: Path) -> None:
        self.gateway, self.metrics, self.db = gateway, metrics, state / "spend.db"

    def post(self, key: str) -> httpx.Response:
        with httpx.Client(base_url=self.gateway.base_url, timeout=10) as client:
            return client.post("/anthropic/v1/messages", json=BODY, headers={"x-api-key": key})

    def rows(self, count: int) -> list[tuple[Any, ...]]:
        return poll(lambda: ledger(self.db), lambda r: len(r) >= count, f"{count} ledger rows")


@pytest.fixture
def setup(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> Setup:
    upstream = start_upstream("anthropic-upstream", responder=respond)
    metrics = free_port()
    top = {
        "metering": True,
        "metering_flush_ms": 50,
        "access": {"keys_file": str(keys_file(tmp_path / "keys.txt"))},
        "metrics": {"address": "127.0.0.1", "port": metrics},
        "spend": {
            "timezone": "UTC", "state_dir": str(tmp_path / "state"), "flush_ms": 100,
            "reservation_usd": 0.01, "budgets": {"teams": {"platform": {"day": 0.08}}},
        },
    }  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    return Setup(gateway, metrics, tmp_path / "state")


def test_a_team_budget_is_charged_from_real_traffic_and_refuses_at_its_cap(setup: Setup) -> None:
    """alice and bob share team platform's $0.08 a day: $0.03 a request, so after three
    ($0.09) the team is over and refuses both; carol (no team) is never refused."""
    for count, key in enumerate((ALICE, BOB, ALICE), start=1):
        assert setup.post(key).status_code == 200
        setup.rows(count)  # settled before the next one is checked
    rows = setup.rows(3)
    assert rows == [
        ("alice", "platform", "injected", COST_NANO), ("bob", "ml,platform", "injected", COST_NANO),
        ("alice", "platform", "injected", COST_NANO),
    ]  # fmt: skip
    refused = poll(lambda: setup.post(BOB), lambda r: r.status_code == 429, "a 429")
    text = refused.json()["error"]["message"]
    assert text.startswith("The daily budget of team 'platform' is used up: $0.09 spent of $0.08")
    assert setup.post(ALICE).status_code == 429
    assert setup.post(CAROL).status_code == 200  # in no team: only the (absent) client caps
    page = scrape(setup.metrics)
    charged = metric_sum(page, "gateway_spend_usd_total", team="platform", paid_by="injected")
    assert charged == pytest.approx(3 * COST_NANO / 1e9)


def test_a_fast_path_record_says_the_client_paid_and_an_undecided_one_says_none(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    """An own key skips the processor (Envoy's fast path): its record takes ``client`` from the
    route. A gateway key while the processor is stalled (SIGSTOP: its streams stay open) gets
    Envoy's error after the processor's timeout, no decision: its record, sent once the
    processor runs again, says ``none`` — no credential is known to have gone upstream."""
    upstream = start_upstream("anthropic-upstream", responder=respond)
    metrics = free_port()
    top = {"metering": True, "metering_flush_ms": 50,
           "access": {"keys_file": str(keys_file(tmp_path / "keys.txt"))},
           "metrics": {"address": "127.0.0.1", "port": metrics}}  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    setup = Setup(start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top), metrics, tmp_path)

    def records(**labels: str) -> float:
        return metric_sum(scrape(metrics), "gateway_usage_requests_total", **labels)

    assert setup.post(OWN).status_code == 200
    poll(records, lambda n: n == 1, "the fast-path record")
    assert records(credential_source="client", client="") == 1
    processor = setup.gateway.extproc_process
    assert processor is not None
    processor.send_signal(signal.SIGSTOP)
    try:
        refused = setup.post(ALICE)
    finally:
        processor.send_signal(signal.SIGCONT)
    assert refused.status_code >= 500 and len(upstream.requests) == 1
    poll(records, lambda n: n == 2, "the undecided request's record")
    assert records(credential_source="none", client="") == 1
    assert records(credential_source="client") == 1
