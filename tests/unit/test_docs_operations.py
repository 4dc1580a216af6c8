"""docs/operations.md's metrics table is the registry: every metric the processor's
``Metrics`` and the spend metrics register is listed with its type, and nothing listed is
missing from the registry."""

from __future__ import annotations

import re
from pathlib import Path

from extproc.server.metrics import Metrics
from extproc.spend.metrics import SpendMetrics

PAGE = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_ROW = re.compile(r"^\| `(gateway_[a-z0-9_]+)` \| (counter|gauge|histogram) \|", re.M)


def _registered() -> dict[str, str]:
    """Exposition name → type, as /metrics shows them (counters end in ``_total``)."""
    metrics = Metrics()
    SpendMetrics(metrics.registry)
    found = {}
    for family in metrics.registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        found[name] = family.type
    return found


def _documented() -> dict[str, str]:
    rows = _ROW.findall(PAGE.read_text())
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "a metric is listed twice"
    return dict(rows)


def test_every_registered_metric_is_documented_with_its_type() -> None:
    registered, documented = _registered(), _documented()
    missing = sorted(set(registered) - set(documented))
    assert not missing, f"registered but not in docs/operations.md: {missing}"
    for name, kind in registered.items():
        assert documented[name] == kind, name


def test_nothing_documented_is_missing_from_the_registry() -> None:
    extra = sorted(set(_documented()) - set(_registered()))
    assert not extra, f"in docs/operations.md but not registered: {extra}"


def test_the_table_is_found_at_all() -> None:
    assert len(_documented()) >= 20
