"""A real Prometheus (Debian's package) scrapes a running gateway and evaluates the spend alert
rules: the cost counters reach it, and a used-up budget fires its alert."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from harness import Gateway, RecordingUpstream, credential_route, free_port
from harness.adversary import write_keys
from harness.liveops import poll
from live.test_live_spend_e2e import ALICE, COST_NANO, MODEL, SERVER, respond

pytestmark = pytest.mark.slow
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "spend-alerts.yml"


@contextmanager
def prometheus(folder: Path, target: str) -> Iterator[str]:
    """Prometheus scraping ``target`` every second with the spend rules; yields its API URL."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is needed (make spend-deps)"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [target]}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def query(api: str, expr: str) -> list[dict[str, Any]]:
    try:
        answer = httpx.get(f"{api}/api/v1/query", params={"query": expr}, timeout=5).json()
    except httpx.HTTPError:
        return []
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def firing(api: str) -> set[str]:
    try:
        alerts = httpx.get(f"{api}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    except httpx.HTTPError:
        return set()
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def test_prometheus_scrapes_the_costs_and_fires_the_budget_alerts(
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
            "state_dir": str(tmp_path / "state"), "flush_ms": 100, "reservation_usd": 0.01,
            "budgets": {"organisation": {"day": 0.20}},
        },
    }  # fmt: skip
    route = credential_route("anthropic", upstream.url(), prefix="/anthropic")
    gateway = start_gateway([route], env={"ANTHROPIC_KEY": SERVER}, top=top)
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        for _ in range(2):
            sent = client.post("/anthropic/v1/messages", json=body, headers={"x-api-key": ALICE})
            assert sent.status_code == 200
    with prometheus(tmp_path, f"127.0.0.1:{metrics}") as api:
        expr = f'sum(gateway_spend_usd_total{{paid_by="injected",model="{MODEL}"}})'
        result = poll(lambda: query(api, expr), bool, "scraped cost", deadline_s=60)
        assert float(result[0]["value"][1]) == pytest.approx(2 * COST_NANO / 1e9)
        alerts = poll(
            lambda: firing(api),
            lambda names: {"GatewayBudgetExhausted", "GatewayBudgetAtSoftThreshold"} <= names,
            "budget alerts firing",
            deadline_s=60,
        )
        assert "GatewaySpendDatabaseDown" not in alerts
