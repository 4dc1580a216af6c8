"""The real Claude Code CLI over a budget: the gateway's 429 names the budget and its reset, with
a retry-after of hours, so the CLI stops at once and prints that message instead of retrying."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from clients.test_clients_claude_code import CLAUDE, QUIET, _environment, _run
from harness import Gateway, RecordingUpstream, credential_route
from harness.adversary import write_keys
from harness.liveops import poll
from live.test_live_spend_e2e import ALICE, MODEL, SERVER, ledger, respond

pytestmark = pytest.mark.slow


def test_claude_code_over_a_budget_stops_at_once_and_prints_the_gateways_message(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    if not os.access(CLAUDE, os.X_OK):
        pytest.fail(f"{CLAUDE} is missing: run `make clients` (npm ci; `make test` does it)")
    upstream = start_upstream("anthropic-upstream", responder=respond)
    write_keys(tmp_path / "keys.txt", {"alice": ALICE})
    top = {
        "metering": True,
        "metering_flush_ms": 50,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "spend": {"state_dir": str(tmp_path / "state"), "flush_ms": 100, "reservation_usd": 0.01,
                  "budgets": {"clients": {"alice": {"day": 0.10}}}},
    }  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:  # $0.11625 of $0.10
        assert (
            client.post(
                "/anthropic/v1/messages", json=body, headers={"x-api-key": ALICE}
            ).status_code
            == 200
        )
    poll(lambda: ledger(tmp_path / "state" / "spend.db"), lambda rows: len(rows) == 1, "the row")
    sent = len(upstream.requests)

    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    env = _environment(QUIET | {"HOME": str(home), "ANTHROPIC_BASE_URL": gateway.url("/anthropic"),
                                "ANTHROPIC_API_KEY": ALICE})  # fmt: skip
    began = time.monotonic()
    code, output = _run([str(CLAUDE), "-p", "say hi"], env, home, 60.0)
    took = time.monotonic() - began
    print(f"claude exited {code} after {took:.1f}s and printed: {output.strip()}")

    assert code not in (0, None), f"claude exited {code}:\n{output}"
    assert "The daily budget of client 'alice' is used up: $0.12 spent of $0.10" in output, output
    assert "It resets at" in output
    assert took < 30, f"Claude Code took {took:.0f}s: it retried instead of stopping"
    assert len(upstream.requests) == sent  # nothing reached the provider


def test_claude_code_under_a_requests_per_minute_limit_waits_and_succeeds(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    if not os.access(CLAUDE, os.X_OK):
        pytest.fail(f"{CLAUDE} is missing: run `make clients` (npm ci; `make test` does it)")
    upstream = start_upstream("anthropic-upstream", responder=respond)
    write_keys(tmp_path / "keys.txt", {"alice": ALICE})
    top = {
        "metering": True,
        "access": {"keys_file": str(tmp_path / "keys.txt")},
        "limits": {"default": {"requests_per_minute": 1}},
    }
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:  # this minute's request
        assert (
            client.post(
                "/anthropic/v1/messages", json=body, headers={"x-api-key": ALICE}
            ).status_code
            == 200
        )
        refused = client.post("/anthropic/v1/messages", json=body, headers={"x-api-key": ALICE})
    assert refused.status_code == 429 and 0 < int(refused.headers["retry-after"]) <= 60

    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    env = _environment(QUIET | {"HOME": str(home), "ANTHROPIC_BASE_URL": gateway.url("/anthropic"),
                                "ANTHROPIC_API_KEY": ALICE})  # fmt: skip
    began = time.monotonic()
    code, output = _run([str(CLAUDE), "-p", "say hi"], env, home, 200.0)
    took = time.monotonic() - began
    print(f"claude exited {code} after {took:.1f}s and printed: {output.strip()}")
    assert code == 0, f"claude exited {code}:\n{output}"
    assert "ok" in output
    limited = [e for e in gateway.access_log() if e.get("status") == 429]
    assert len(limited) >= 2, limited  # ours above, and at least one Claude Code waited out
