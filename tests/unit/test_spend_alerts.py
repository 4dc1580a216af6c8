"""The spend alert rules pass ``promtool test rules`` (Debian's prometheus package), and every
metric the rules and the Grafana dashboard name is one the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from extproc.config.spend import Budget, Period, Spend
from extproc.spend.budgets import Budgets
from extproc.spend.metrics import MAX_LABELS, OTHER, SpendMetrics
from extproc.usage.record import UsageRecord

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "spend-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "spend-dashboard.json"
_NAME = re.compile(r"\b(gateway_spend_[a-z_]+)")


def test_the_alert_rules_pass_their_promtool_tests() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus package is needed (make spend-deps)"
    done = subprocess.run(
        [promtool, "test", "rules", "spend-alerts.test.yml"],
        cwd=RULES.parent, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def exported() -> str:
    registry = CollectorRegistry()
    metrics = SpendMetrics(registry, teams=("ml",))
    spend = Spend(teams=(("ml", Budget(day=Decimal(5))),))
    metrics.watch(Budgets(spend))
    record = UsageRecord(0, "r", "a", "alice", ("ml",), "injected", "claude-opus-4-1", 200, 1)
    metrics.priced(record, 2_250_000_000)
    metrics.priced(record, None)
    metrics.unknown_price("x")
    metrics.soft_threshold("client", "alice", Period.DAY)
    metrics.ledger(3, 1, 0.5, 2, True)
    return generate_latest(registry).decode()


def test_every_metric_the_rules_and_the_dashboard_name_is_exported() -> None:
    text = exported()
    names = set(re.findall(r"^(gateway_spend_[a-z_]+)", text, re.MULTILINE))
    rules = yaml.safe_load(RULES.read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs += [target["expr"] for panel in panels for target in panel["targets"]]
    used = {name for expr in exprs for name in _NAME.findall(expr)}
    assert used and used <= names, used - names
    assert (
        'gateway_spend_usd_total{model="claude-opus-4-1",paid_by="injected",team="ml"} 2.25' in text
    )
    assert 'gateway_spend_budget_limit_usd{name="ml",period="day",scope="team"} 5.0' in text


def test_labels_stay_bounded() -> None:
    registry = CollectorRegistry()
    metrics = SpendMetrics(registry)
    for i in range(MAX_LABELS + 50):
        metrics.priced(UsageRecord(0, "r", "a", "c", (f"t{i}",), "injected", f"m{i}", 200, 1), 1)
    text = generate_latest(registry).decode()
    assert text.count("gateway_spend_usd_total{") == MAX_LABELS + 1
    assert f'model="{OTHER}",paid_by="injected",team="{OTHER}"' in text
