"""What a gateway serves, for ``status``: the processor's record and Envoy's versions.

The processor writes its record (``state.PROCESSOR_FILE``) after every load and
whenever the limits store comes or goes; ``status`` reads it and asks Envoy's
admin API which version it last took. Counts and versions only: never a key,
a secret or the store's URL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from extproc.config.model import GatewayConfig
from extproc.runtime import state
from extproc.runtime.reload import PolicyHolder
from extproc.runtime.xds import EnvoyAway, envoy_versions
from extproc.spend.version import table_version

STUCK_SECONDS = 60.0  # a watcher round older than this: the watcher is stuck


def client_count(holder: PolicyHolder) -> int:
    """Gateway clients (names, not keys) across every keys file of the served policy."""
    names: set[str] = set()
    for table in holder.policy.keys.values():
        names.update(identity.name for identity in table.by_digest.values())
    return len(names)


def store_kind(config: GatewayConfig) -> str:
    if config.limits is None:
        return "none"
    return "redis" if config.limits.shared else "memory"


def watcher_stuck(holder: PolicyHolder, alive: bool, now: float | None = None) -> bool:
    """A dead watcher thread, or one whose last round began too long ago."""
    now = time.monotonic() if now is None else now
    return not alive or now - holder.watched_at > STUCK_SECONDS


class ProcessorRecord:
    """Keeps ``processor.json`` up to date for one processor (not written by workers)."""

    def __init__(self, holder: PolicyHolder, target: str) -> None:
        self.holder = holder
        self.target = target
        self.serving = False
        self.store_up: bool | None = None
        self.watcher = "starting"
        self._written: dict[str, Any] = {}

    def store_synced(self, ok: bool) -> None:
        if ok != self.store_up:
            self.store_up = ok
            self.write()

    def write(self) -> None:
        holder = self.holder
        config = holder.config
        if config is None:
            return
        record: dict[str, Any] = {
            "pid": os.getpid(),
            "target": self.target,
            "serving": self.serving,
            "version": holder.policy.version,
            "last_load_ok": holder.last_ok,
            "retry_pending": holder.retry.due is not None,
            "routes": len(config.routes),
            "clients": client_count(holder),
            "store": store_kind(config),
            "store_up": self.store_up,
            "watcher": self.watcher,
            "prices": table_version(config.spend.prices) if config.spend else None,
        }
        if record != self._written:  # the watchdog asks every few seconds: write changes only
            state.write_state(holder.config_path, state.PROCESSOR_FILE, record)
            self._written = record


def report(config_path: Path, config: GatewayConfig) -> tuple[bool, list[str]]:
    """The lines ``status`` prints, and whether processor and Envoy serve one version."""
    record = state.read_state(config_path, state.PROCESSOR_FILE)
    lines = []
    if record is None:
        lines.append("processor: no running processor has reported for this config")
        version = None
    else:
        version = record.get("version")
        lines += _processor_lines(record)
    try:
        versions = envoy_versions(config.admin)
    except EnvoyAway:
        lines.append(f"envoy: not running (no admin on {config.admin.address}:{config.admin.port})")
        return False, lines
    except OSError as exc:
        lines.append(f"envoy: admin did not answer: {exc}")
        return False, lines
    shown = ", ".join(f"{kind} {value or '-'}" for kind, value in versions.items())
    lines.append(f"envoy: config version {shown}")
    same = version is not None and all(v == version for v in versions.values())
    lines.append("in step: yes" if same else "in step: NO (processor and Envoy differ)")
    return same, lines


def _processor_lines(record: dict[str, Any]) -> list[str]:
    store = record.get("store")
    if store == "redis":
        up = record.get("store_up")
        store = "redis " + ("not synced yet" if up is None else "up" if up else "DOWN")
    last = "ok" if record.get("last_load_ok") else "FAILED (last good config kept)"
    if record.get("retry_pending"):
        last += ", delivery retry pending"
    return [
        f"processor: pid {record.get('pid')} on {record.get('target')}, "
        f"{'SERVING' if record.get('serving') else 'not serving'}",
        f"  config version {record.get('version')}, last load {last}",
        f"  routes {record.get('routes')}, gateway clients {record.get('clients')}",
        f"  limits store {store}, watcher {record.get('watcher')}",
        *([f"  spend prices {record['prices']}"] if record.get("prices") else []),
    ]
