"""The ``limits`` and ``metering`` sections: per-gateway-client limits on the organisation's key.

Parsed apart from the rest of the YAML because they are their own concern:
a default limit, per-client overrides merged over it field by field, and the
counter store that makes them hold across workers and replicas.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from extproc.config import fields, model
from extproc.config.sections import Problems, Section

LIMITS = fields.LIMITS.names
_LIMIT = fields.LIMIT.names
_CLIENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")  # as in the keys file
_DURATION = re.compile(r"^(?P<n>[1-9][0-9]{0,6})(?P<unit>[smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Host, port and db only: a password goes in ``password`` (a secret), never in the URL.
_STORE = re.compile(r"^(memory|rediss?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[0-9]{1,2})?)$")


def limits(
    s: Section | None, problems: Problems, secret: Any, workers: int | None, metering: bool
) -> model.Limits | None:
    """``limits`` as a model; None if absent or invalid (problems say why)."""
    if s is None or not s.ok:
        return None
    store = s.text("store", "memory")
    if store is not None and not _STORE.match(store):
        s.error("store", "expected memory or redis://host[:port][/db] (rediss:// for TLS)")
        store = None
    password = secret(s.section("password", ["env", "file"])) if s.has("password") else None
    if s.has("password") and store == "memory":
        s.error("password", "only a redis store takes a password")
    failure = s.choice("on_store_error", model.StoreFailure, model.StoreFailure.OPEN)
    sync_ms = fields.LIMITS.integer(s, "sync_ms")
    default = limit(s.section("default", _LIMIT), model.Limit()) if s.has("default") else None
    clients = _clients(s, problems, default or model.Limit())
    if store == "memory" and workers is not None and workers > 1:
        s.error("store", "with several workers, limits need a shared store (redis://…)")
        store = None
    if not metering and _needs_metering(default, clients):
        s.error(None, "token and concurrency limits need metering: true")
        store = None
    values = (store, failure, sync_ms, clients)
    if None in values or (s.has("default") and default is None):
        return None
    if s.has("password") and password is None:
        return None
    assert store and failure and sync_ms and clients is not None
    return model.Limits(default or model.Limit(), clients, store, password, failure, sync_ms)


def _clients(
    s: Section, problems: Problems, default: model.Limit
) -> tuple[tuple[str, model.Limit], ...] | None:
    if not s.has("clients"):
        return ()
    raw = s.raw["clients"]
    if not isinstance(raw, dict):
        s.error("clients", "expected a mapping of client names to limits")
        return None
    found: list[tuple[str, model.Limit]] = []
    bad = False
    for name, block in raw.items():
        if not isinstance(name, str) or not _CLIENT.match(name):
            s.error("clients", f"{str(name)[:64]!r} is not a client name as in the keys file")
            bad = True
            continue
        merged = limit(Section(problems, (*s.path, "clients", name), block, _LIMIT), default)
        bad = bad or merged is None
        if merged is not None:
            found.append((name, merged))
    return None if bad else tuple(found)


def _needs_metering(
    default: model.Limit | None, clients: tuple[tuple[str, model.Limit], ...] | None
) -> bool:
    blocks = [default or model.Limit(), *(block for _, block in clients or ())]
    return any(b.tokens is not None or b.concurrent is not None for b in blocks)


def limit(s: Section | None, base: model.Limit) -> model.Limit | None:
    """One limit block merged over ``base``; ``null`` for a field lifts the base's limit.

    Every bad field of the block is reported, not only the first.
    """
    if s is None or not s.ok:
        return None
    values: dict[str, Any] = {}
    ok = True
    for key in ("requests_per_minute", "tokens", "concurrent"):
        if key in s.raw:
            values[key] = None if s.raw[key] is None else fields.LIMIT.integer(s, key)
            ok = ok and (s.raw[key] is None or values[key] is not None)
    if "token_window" in s.raw:
        values["token_window_s"] = _duration(s.raw["token_window"])
        if values["token_window_s"] is None:
            s.error("token_window", "expected a duration like 60s, 30m, 12h or 1d")
            ok = False
    return replace(base, **values) if ok else None


def _duration(value: Any) -> int | None:
    match = _DURATION.match(value) if isinstance(value, str) else None
    return int(match["n"]) * _UNITS[match["unit"]] if match else None
