"""The ``spend`` command reads the ledger: totals by client, team, model and payer; a client's budgets."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from extproc.cli import main
from extproc.config.load import load_config
from extproc.spend.service import SpendService, open_database
from extproc.usage.record import UsageRecord

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - name: anthropic
    prefix: /anthropic/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: K}}
metering: true
spend:
  timezone: Europe/Berlin
  state_dir: state
  budgets:
    organisation: {month: 1000}
    default: {day: 10}
    teams: {ml: {week: 20}}
"""


def rec(client: str, teams: tuple[str, ...], source: str, model: str, **tokens: int) -> UsageRecord:
    return UsageRecord(
        time.time(), "r", "anthropic", client, teams, source, model, 200, 5, **tokens
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    spend = load_config(path).spend
    assert spend is not None
    service = SpendService(spend, open_database(spend))
    service.records([
        # claude-opus-4-1: 0.1M in x $15 + 0.01M out x $75 = $2.25
        rec("alice", ("ml",), "injected", "claude-opus-4-1", input=10**5, output=10**4),
        rec("alice", ("ml",), "injected", "claude-opus-4-1", input=10**5, output=10**4),
        # claude-sonnet-4-5: 100 input at $3 + 100,000 cache reads at $0.30 per million
        rec("bob", ("ml", "web"), "client", "claude-sonnet-4-5", input=100, output=0, cache_read=100_000),
        rec("carol", (), "injected", "mystery-model", input=5, output=5),
    ])  # fmt: skip
    service.close()
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["spend", *args]) == 0
    return capsys.readouterr().out


def test_totals_by_client_as_json(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = json.loads(run(capsys, str(config), "--format", "json"))
    by_name = {r["name"]: r for r in rows}
    assert by_name["alice"]["charged_usd"] == "4.500000"
    assert by_name["alice"]["requests"] == 2 and by_name["alice"]["input"] == 2 * 10**5
    # 100 x $3 + 100,000 cache reads x $0.30 per million: API-equivalent, never charged
    assert by_name["bob"]["charged_usd"] == "0.000000"
    assert by_name["bob"]["api_equivalent_usd"] == "0.030300"
    assert by_name["carol"]["unknown_cost"] == 1 and by_name["carol"]["charged_usd"] == "0.000000"


def test_totals_by_team_model_and_payer(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teams = {
        r["name"]: r
        for r in json.loads(run(capsys, str(config), "--by", "team", "--format", "json"))
    }
    assert set(teams) == {"ml", "web", ""} and teams["ml"]["requests"] == 3
    text = run(capsys, str(config), "--by", "paid_by", "--format", "csv", "--period", "day")
    payers = {r["name"]: r for r in csv.DictReader(io.StringIO(text))}
    assert payers["injected"]["charged_usd"] == "4.500000" and payers["client"]["requests"] == "1"
    table = run(capsys, str(config), "--by", "model")
    assert table.splitlines()[0].split()[:3] == ["name", "requests", "input"]
    assert "claude-opus-4-1" in table and "mystery-model" in table


def test_one_clients_budgets_used_remaining_and_reset(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = json.loads(run(capsys, str(config), "--client", "alice", "--format", "json"))
    found = {(line["budget"], line["period"]): line for line in lines}
    assert found[("client 'alice'", "day")]["used_usd"] == "4.500000"
    assert found[("client 'alice'", "day")]["remaining_usd"] == "5.500000"
    assert found[("team 'ml'", "week")]["used_usd"] == "4.500000"  # bob paid himself: not counted
    assert found[("the organisation", "month")]["remaining_usd"] == "995.500000"
    assert found[("client 'alice'", "day")]["resets"].endswith("T00:00:00+01:00")


def test_a_bad_date_is_one_line_not_a_traceback(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["spend", str(config), "--from", "last tuesday"]) == 2
    assert (
        capsys.readouterr().err == "spend: --from: expected an ISO date or time, like 2026-12-01\n"
    )


def test_status_names_the_price_table(config: Path) -> None:
    from extproc.runtime.status import _processor_lines
    from extproc.spend.prices import PriceBook
    from extproc.spend.version import table_version

    spend = load_config(config).spend
    assert spend is not None
    assert PriceBook(spend.prices).version == table_version(()) == "genai-prices 0.2.3"
    lines = _processor_lines({"prices": table_version(()), "store": "memory"})
    assert lines[-1] == "  spend prices genai-prices 0.2.3"
    assert not any("spend" in line for line in _processor_lines({"store": "memory"}))


def test_an_unset_database_password_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPEND_DB_PASSWORD", raising=False)
    path = tmp_path / "gateway.yaml"
    shared = "  store: postgresql://gateway@127.0.0.1:9/spend\n"
    shared += "  password: {env: SPEND_DB_PASSWORD}\n"
    path.write_text(CONFIG.split("  timezone:", maxsplit=1)[0] + shared)
    assert main(["spend", str(path)]) == 2
    assert capsys.readouterr().err == "spend: environment variable SPEND_DB_PASSWORD is not set\n"
