"""docs/configuration.md is the config model: generated from the field tables, whose
defaults are the model's, whose bounds the loader enforces, and whose reload column is
what a live reload refuses."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from extproc import reference
from extproc.config import fields, model
from extproc.config.identity import Sso
from extproc.config.limits import _duration
from extproc.config.load import load_config
from extproc.config.sections import ConfigError
from extproc.config.spend import Budget, Price, Spend
from extproc.runtime.reload import RESTART_ONLY, _restart_only_changes

# Which model class each table builds; ADMIN/METRICS/LISTENER_TLS/BUDGETS have no defaults there.
MODELS: dict[str, type] = {
    "": model.GatewayConfig, "listener": model.Listener, "extproc": model.ExtprocSettings,
    "access": model.AccessControl, "routes[]": model.Route, "routes[].credential": model.Credential,
    "routes[].credential.secret": model.SecretRef, "limits": model.Limits,
    "limits.default": model.Limit, "spend": Spend, "spend.prices.MODEL": Price,
    "spend.budgets.default": Budget, "sso": Sso,
}  # fmt: skip
# Model attributes no YAML key sets directly (derived, or held by another table).
NOT_FROM_YAML = {
    "source", "source_digest", "origin", "jwks", "clients", "organisation", "default", "teams",
    "tls", "secret", "mode", "upstream",
}  # fmt: skip
BASE = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - {name: r, prefix: /r, upstream: 'http://127.0.0.1:1'}
"""
# Where a table's fields go in a file otherwise BASE (the sso block names its jwks_uri: no
# discovery request).
PLACES = {
    "": "{field}: {value}\n",
    "listener": "",
    "admin": "admin: {{{field}: {value}}}\n",
    "metrics": "metrics: {{{field}: {value}}}\n",
    "extproc": "extproc: {{{field}: {value}}}\n",
    "limits": "metering: true\nlimits: {{{field}: {value}}}\n",
    "limits.default": "metering: true\nlimits: {{default: {{{field}: {value}}}}}\n",
    "spend": "spend: {{{field}: {value}}}\n",
    "sso": "sso: {{issuer: 'http://127.0.0.1:1', audiences: [a], "
    "jwks_uri: 'http://127.0.0.1:1/jwks', {field}: {value}}}\n",
}


def _comparable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value) or None  # an empty list is "not set" (—)
    return value


def test_the_page_is_what_the_tables_generate() -> None:
    assert reference.PAGE.read_text() == reference.render(), (
        "docs/configuration.md is stale: run .venv/bin/python -m extproc.reference"
    )


def test_the_check_command_says_whether_the_page_is_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert reference.main(["--check"]) == 0
    monkeypatch.setattr(reference, "PAGE", tmp_path / "configuration.md")
    assert reference.main(["--check"]) == 1
    assert reference.main([]) == 0
    assert reference.main(["--check"]) == 0


@pytest.mark.parametrize("path", sorted(MODELS))
def test_every_model_attribute_is_in_its_table_with_the_models_default(path: str) -> None:
    table = next(t for t in fields.TABLES if t.path == path)
    by_attr = {f.attr or f.name: f for f in table.fields}
    for attribute in dataclasses.fields(MODELS[path]):
        if attribute.name in NOT_FROM_YAML and attribute.name not in by_attr:
            continue
        assert attribute.name in by_attr, f"{path}.{attribute.name} is not in its field table"
        field = by_attr[attribute.name]
        nested = dataclasses.is_dataclass(attribute.default)  # a sub-table's defaults
        if attribute.default is dataclasses.MISSING or field.required or nested:
            continue
        documented = field.default
        if attribute.name == "token_window_s":
            documented = _duration(documented)
        elif isinstance(attribute.default, Decimal):
            documented = Decimal(documented)
        elif attribute.name == "system_ca_file":
            continue  # the host's bundle, found at load
        assert documented == _comparable(attribute.default), f"{path}.{field.name}"


def _bounded() -> list[tuple[str, fields.Field]]:
    return [
        (t.path, f)
        for t in fields.TABLES
        for f in t.fields
        if f.low is not None and t.path in (*PLACES, "routes[]")
    ]


def _file(path: str, field: str, value: int) -> str:
    if path == "listener":
        return BASE.replace("port: 4000}", f"port: 4000, {field}: {value}}}").replace(
            "port: 4000, port:", "port:"
        )
    if path == "routes[]":
        return BASE.replace("upstream:", f"{field}: {value}, upstream:")
    return BASE + PLACES[path].format(field=field, value=value)


@pytest.mark.parametrize(("path", "field"), _bounded(), ids=lambda x: getattr(x, "name", x))
def test_the_loader_enforces_the_tables_bounds(
    path: str, field: fields.Field, tmp_path: Path
) -> None:
    assert field.low is not None and field.high is not None
    name = tmp_path / "gateway.yaml"
    where = path.replace("[]", "[0]")
    qualified = f"{where}.{field.name}" if where else field.name
    for bad in (field.low - 1, field.high + 1):
        name.write_text(_file(path, field.name, bad))
        with pytest.raises(ConfigError) as caught:
            load_config(name)
        wanted = f"{qualified}: must be between {field.low} and {field.high}, got {bad}"
        assert any(wanted in p for p in caught.value.problems), caught.value.problems
    for good in (field.low, field.high):
        name.write_text(_file(path, field.name, good))
        try:
            load_config(name)
        except ConfigError as exc:  # another rule may refuse the value; never the bound
            assert not any("must be between" in p for p in exc.problems), exc.problems


def test_the_reload_column_is_what_a_live_reload_refuses(tmp_path: Path) -> None:
    name = tmp_path / "gateway.yaml"
    name.write_text(BASE + "limits: {store: memory}\n")
    old = load_config(name)
    changed = {
        "extproc": dataclasses.replace(old, extproc=model.ExtprocSettings(timeout_ms=300)),
        "admin": dataclasses.replace(old, admin=model.Endpoint("127.0.0.1", 9902)),
        "metrics": dataclasses.replace(old, metrics=model.Endpoint("127.0.0.1", 9465)),
        "metering": dataclasses.replace(old, metering=True),
        "limits.store": dataclasses.replace(
            old, limits=dataclasses.replace(old.limits or model.Limits(), sync_ms=300)
        ),
    }
    assert set(changed) == set(RESTART_ONLY)
    for name_, new in changed.items():
        assert _restart_only_changes(old, new) == [f"{name_}: changing it needs a restart"]
    live = dataclasses.replace(old, metering_flush_ms=500)
    assert _restart_only_changes(old, live) == []
    assert reference.reload("limits.sync_ms") == "restart"
    assert reference.reload("extproc.workers") == "restart"
    assert reference.reload("limits.default") == "live"
    assert reference.reload("metering_flush_ms") == "live"


def test_spend_fields_kept_until_a_restart_are_marked_so(tmp_path: Path) -> None:
    """A reload that changes them is taken, but the running spend service keeps the old ones."""
    from extproc.spend.service import KEPT_UNTIL_RESTART, SpendService, open_database

    name = tmp_path / "gateway.yaml"
    name.write_text(BASE + "metering: true\nspend: {timezone: UTC}\n")
    old = load_config(name).spend
    name.write_text(BASE + "metering: true\nspend: {timezone: Europe/Berlin, soft_percent: 50}\n")
    new = load_config(name).spend
    assert old is not None and new is not None
    service = SpendService(old, open_database(old, {}))
    try:
        service.reconfigure(new)
        assert service.spend.timezone == "UTC"
        assert service.spend.soft_percent == 50
    finally:
        service.close()
    assert {reference.reload(f"spend.{n}") for n in KEPT_UNTIL_RESTART} == {"at restart"}
    assert reference.reload("spend.soft_percent") == "live"
