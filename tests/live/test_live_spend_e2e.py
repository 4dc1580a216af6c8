"""Spend end to end through real Envoy: Anthropic-shaped JSON and SSE answers with cache reads and
5-minute and 1-hour cache writes; the exact cost of each request in the ledger and the metrics,
checked by hand against the price table; a client refused at its budget with the reset time."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Gateway, RecordingUpstream, credential_route, free_port
from harness.adversary import scrape, write_keys
from harness.liveops import metric_sum, poll
from harness.upstream import RecordedRequest, Reply

pytestmark = pytest.mark.slow  # real Envoy and processor

ALICE, SERVER, OWN = "gk-alice-spend-key", "sk-ant-server-spend", "sk-ant-api03-own-spend"
MODEL = "claude-opus-4-1"
USAGE = {
    "input_tokens": 1000,
    "output_tokens": 200,
    "cache_read_input_tokens": 5000,
    "cache_creation_input_tokens": 3000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
}
# claude-opus-4-1, USD per million tokens: input 15, output 75, cache read 1.50,
# 5-minute write 18.75, 1-hour write 30:
# 1000 x 15 + 200 x 75 + 5000 x 1.5 + 1000 x 18.75 + 2000 x 30 = 116,250 per million = $0.11625
COST_NANO = 116_250_000
SSE = (("content-type", "text/event-stream"),)


def message(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_spend", "type": "message", "role": "assistant", "model": MODEL,
        "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": usage,
    }  # fmt: skip


def respond(request: RecordedRequest) -> Reply:
    if request.method == "HEAD":
        return Reply(200)
    if not json.loads(request.body).get("stream"):
        return Reply(200, json.dumps(message(USAGE)).encode())
    start = {**message({**USAGE, "output_tokens": 1}), "content": [], "stop_reason": None}
    events = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "ok"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": USAGE["output_tokens"]}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    chunks = [f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events]
    return Reply(200, headers=SSE, chunks=chunks)


def ledger(path: Path) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT client, paid_by, model, input, output, cache_read, cache_write_5m, "
            "cache_write_1h, cost_nano, session_id FROM ledger ORDER BY id"
        ).fetchall()


def test_exact_cost_in_the_ledger_and_metrics_then_the_budget_refuses(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    upstream = start_upstream("anthropic-upstream", responder=respond)
    write_keys(tmp_path / "keys.txt", {"alice": ALICE})
    metrics = free_port()
    top = {
        "metering": True,
        "metering_flush_ms": 50,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "metrics": {"address": "127.0.0.1", "port": metrics},
        "spend": {
            "timezone": "UTC", "state_dir": str(tmp_path / "state"), "flush_ms": 100,
            "reservation_usd": 0.01, "budgets": {"clients": {"alice": {"day": 0.30}}},
        },
    }  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    path = tmp_path / "state" / "spend.db"

    def post(key: str, **extra: Any) -> httpx.Response:
        headers = {"x-api-key": key, "x-claude-code-session-id": "sess-1"}
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            return client.post("/anthropic/v1/messages", json={**body, **extra}, headers=headers)

    assert post(ALICE).status_code == 200
    assert "message_stop" in post(ALICE, stream=True).text
    assert post(OWN).status_code == 200  # the client's own key: priced, never charged
    rows = poll(lambda: ledger(path), lambda r: len(r) == 3, "ledger rows")
    paid = ("alice", "injected", MODEL, 1000, 200, 5000, 1000, 2000, COST_NANO, "sess-1")
    assert rows[:2] == [paid, paid]
    assert rows[2][1] == "client" and rows[2][8] == COST_NANO
    page = scrape(metrics)
    charged = metric_sum(page, "gateway_spend_usd_total", paid_by="injected", model=MODEL)
    assert charged == pytest.approx(2 * COST_NANO / 1e9)
    assert metric_sum(page, "gateway_spend_usd_total", paid_by="client") == pytest.approx(0.11625)

    assert post(ALICE).status_code == 200  # $0.2325 of $0.30 spent: admitted, then $0.34875
    poll(lambda: ledger(path), lambda r: len(r) == 4, "ledger rows")
    sent = len(upstream.requests)
    refused = poll(lambda: post(ALICE), lambda r: r.status_code == 429, "a 429")
    assert refused.json()["error"]["type"] == "rate_limit_error"
    text = refused.json()["error"]["message"]
    assert text.startswith("The daily budget of client 'alice' is used up: $0.35 spent of $0.30")
    assert "It resets at " in text and text.endswith("T00:00:00+00:00.")
    assert 0 < int(refused.headers["retry-after"]) <= 86400
    assert len(upstream.requests) == sent  # never reached the provider
    assert post(OWN).status_code == 200  # client-paid traffic is never blocked

    # budgets reload live: a higher cap admits alice again, without a restart
    top["spend"]["budgets"] = {"clients": {"alice": {"day": 1.00}}}
    gateway.reconfigure(top=top)
    poll(lambda: post(ALICE).status_code, lambda code: code == 200, "admitted after the reload")


def test_fifty_concurrent_requests_overshoot_within_the_stated_bound(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    release = threading.Event()

    def held(request: RecordedRequest) -> Reply:
        release.wait(30)  # every request is in flight (or refused) before any record arrives
        return respond(request)

    upstream = start_upstream("anthropic-upstream", responder=held)
    write_keys(tmp_path / "keys.txt", {"alice": ALICE})
    cap, estimate = Decimal("1.00"), Decimal("0.10")
    top = {
        "metering": True,
        "metering_flush_ms": 50,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "spend": {
            "timezone": "UTC", "state_dir": str(tmp_path / "state"), "flush_ms": 100,
            "reservation_usd": float(estimate), "budgets": {"clients": {"alice": {"day": float(cap)}}},
        },
    }  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    codes: list[int] = []

    def one() -> None:
        with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
            answer = client.post("/anthropic/v1/messages", json=body, headers={"x-api-key": ALICE})
            codes.append(answer.status_code)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for thread in threads:
        thread.start()
    poll(lambda: len(upstream.requests) + codes.count(429), lambda n: n == 50, "all decided")
    release.set()
    for thread in threads:
        thread.join(30)
    admitted = codes.count(200)
    assert admitted + codes.count(429) == 50
    # committed (spent 0 + reserved) stays under the cap until the 10th reservation
    assert admitted == int(cap / estimate)
    rows = poll(lambda: ledger(tmp_path / "state" / "spend.db"), lambda r: len(r) == 50, "rows")
    charged = [r for r in rows if r[1] == "injected"]  # the 429s are rows too, paid by nobody
    assert len(charged) == admitted
    spent = Decimal(sum(r[8] for r in charged)) / 10**9
    cost = Decimal(COST_NANO) / 10**9
    bound = estimate + admitted * max(Decimal(0), cost - estimate)
    overshoot = spent - cap
    print(
        f"50 concurrent: {admitted} admitted, spent ${spent}, overshoot ${overshoot}, bound ${bound}"
    )
    assert 0 < overshoot <= bound  # each cost $0.11625 against its $0.10 estimate


def test_a_kill_9_of_the_processor_keeps_the_budget_and_the_ledger(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    upstream = start_upstream("anthropic-upstream", responder=respond)
    write_keys(tmp_path / "keys.txt", {"alice": ALICE})
    top = {
        "metering": True,
        "metering_flush_ms": 50,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "spend": {"state_dir": str(tmp_path / "state"), "flush_ms": 100, "reservation_usd": 0.01,
                  "budgets": {"clients": {"alice": {"day": 0.20}}}},
    }  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    path = tmp_path / "state" / "spend.db"

    def post() -> httpx.Response:
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            return client.post("/anthropic/v1/messages", json=body, headers={"x-api-key": ALICE})

    assert [post().status_code, post().status_code] == [200, 200]  # $0.2325 of $0.20
    poll(lambda: ledger(path), lambda rows: len(rows) == 2, "both rows written")
    assert post().status_code == 429
    process = gateway.extproc_process
    assert process is not None
    process.kill()  # SIGKILL: no flush, no goodbye
    process.wait(timeout=10)
    gateway.extproc_process = None
    gateway.start_extproc()
    after = post()
    assert after.status_code == 429, after.text  # rebuilt from the ledger at start
    assert "$0.23 spent of $0.20" in after.json()["error"]["message"]
    assert [r[8] for r in ledger(path) if r[1] == "injected"] == [COST_NANO, COST_NANO]
