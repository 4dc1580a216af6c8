"""The ``spend:`` section: exact amounts, merged budgets, and every mistake at once with its line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from extproc.config.load import load_config
from extproc.config.model import StoreFailure
from extproc.config.sections import ConfigError
from extproc.config.spend import Budget, Period, Price
from extproc.policy.compiled import compile_policy

BASE = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - name: anthropic
    prefix: /anthropic/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: K}}
metering: true
"""

FULL = (
    BASE
    + """\
spend:
  timezone: Europe/Berlin
  state_dir: var
  reservation_usd: 0.25
  on_store_error: closed
  prices:
    ours-1: {input: 0.3, output: 1.2, cache_read: 0.03}
  budgets:
    organisation: {month: 5000}
    default: {day: 20, month: 300}
    clients:
      alice: {day: 50.10, month: null}
    teams:
      platform: {week: 200}
"""
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return list(caught.value.problems)


def test_a_full_section_reads_back_exactly(tmp_path: Path) -> None:
    spend = load_config(write(tmp_path, FULL)).spend
    assert spend is not None
    assert spend.timezone == "Europe/Berlin"
    assert spend.state_dir == tmp_path / "var" and spend.sqlite_file == tmp_path / "var/spend.db"
    assert spend.reservation_usd == Decimal("0.25")
    assert spend.on_store_error is StoreFailure.CLOSED
    assert spend.prices == (("ours-1", Price(Decimal("0.3"), Decimal("1.2"), Decimal("0.03"))),)
    assert spend.organisation == Budget(month=Decimal(5000))
    assert spend.default == Budget(day=Decimal(20), month=Decimal(300))
    # merged over the default field by field; null lifts the default's cap
    assert spend.clients == (("alice", Budget(day=Decimal("50.1"))),)
    assert spend.teams == (("platform", Budget(week=Decimal(200))),)
    assert spend.teams[0][1].caps() == ((Period.WEEK, Decimal(200)),)
    assert not spend.shared


def test_defaults_without_the_section(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE)).spend is None
    spend = load_config(write(tmp_path, BASE + "spend: {}\n")).spend
    assert spend is not None and spend.timezone == "UTC" and spend.store == "sqlite"
    assert spend.reservation_usd == Decimal("0.50") and spend.soft_percent == 80


def test_every_mistake_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    text = (
        BASE
        + """\
spend:
  timezone: Mars/Olympus
  store: mysql://db
  reservation_usd: -1
  prices:
    ours: {input: 1}
    bad model!: {input: 1, output: 1}
  budgets:
    organisation: {month: lots}
    clients:
      alice: {dai: 5}
"""
    )
    assert problems(tmp_path, text) == [
        "gateway.yaml:9 spend.timezone: expected an IANA time zone name like UTC or Europe/Berlin",
        "gateway.yaml:10 spend.store: expected sqlite or postgresql://[user@]host[:port]/database",
        "gateway.yaml:11 spend.reservation_usd: expected an amount in USD between 0 and 1000000000, e.g. 25 or 0.5",
        "gateway.yaml:12 spend.prices: 'bad model!' is not a model name",
        "gateway.yaml:13 spend.prices.ours: missing required field 'output'",
        "gateway.yaml:16 spend.budgets.organisation.month: expected an amount in USD between 0 and 1000000000, e.g. 25 or 0.5",
        "gateway.yaml:18 spend.budgets.clients.alice.dai: unknown field (allowed: day, month, week)",
    ]


def test_budgets_need_metering_and_a_password_needs_postgresql(tmp_path: Path) -> None:
    text = BASE.replace("metering: true\n", "") + (
        "spend:\n  password: {env: PG}\n  budgets: {organisation: {day: 1}}\n"
    )
    assert problems(tmp_path, text) == [
        "gateway.yaml:8 spend.password: only a postgresql store takes a password",
        "gateway.yaml:7 spend: budgets need metering: true (spend is priced from usage records)",
    ]


def test_a_postgresql_store_with_its_password(tmp_path: Path) -> None:
    text = BASE + "spend:\n  store: postgresql://gw@127.0.0.1:5432/spend\n  password: {env: PG}\n"
    spend = load_config(write(tmp_path, text)).spend
    assert spend is not None and spend.shared and spend.password is not None
    assert spend.password.env == "PG"


def test_envoy_lets_the_processor_set_retry_after_on_a_budget_refusal(tmp_path: Path) -> None:
    from extproc.render.extproc_filter import mutation_rules

    regex = mutation_rules(load_config(write(tmp_path, FULL)))["allow_expression"]["regex"]
    assert "retry\\-after" in regex or "retry-after" in regex
    assert (
        "retry"
        not in mutation_rules(load_config(write(tmp_path, BASE)))["allow_expression"]["regex"]
    )


def test_validate_names_an_unusable_database_password_as_it_names_a_route_secret(
    tmp_path: Path,
) -> None:
    """``serve`` reads it when the spend service starts: a missing one was not a config error."""
    text = BASE + "spend:\n  store: postgresql://gw@127.0.0.1:5432/spend\n  password: {env: PG}\n"
    config = load_config(write(tmp_path, text))
    with pytest.raises(ConfigError) as caught:
        compile_policy(config, {"K": "sk-server"})
    assert caught.value.problems == (
        "gateway.yaml:10 spend.password: environment variable PG is not set",
    )
    (tmp_path / "pg.pw").write_bytes(b"pa\xffss\n")
    config = load_config(write(tmp_path, text.replace("{env: PG}", "{file: pg.pw}")))
    with pytest.raises(ConfigError) as caught:
        compile_policy(config, {"K": "sk-server"})
    assert caught.value.problems == (
        f"gateway.yaml:10 spend.password: file {tmp_path / 'pg.pw'} is not UTF-8 text",
    )
    assert "\\xff" not in str(caught.value.problems)
    (tmp_path / "pg.pw").write_text("pass\n")
    compile_policy(config, {"K": "sk-server"})  # readable UTF-8: no problem
