"""Live reload: the current policy, how a new one replaces it, and the file watcher.

A reload validates the YAML and reads every secret; only if all of it is good
does it swap the policy (one reference assignment) and hand Envoy the new
resources. Otherwise the last good policy keeps serving and the error is
logged once and shown in metrics and health details.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from extproc.config.load import load_config, warnings
from extproc.config.model import GatewayConfig
from extproc.config.sections import ConfigError
from extproc.policy.compiled import Policy, compile_policy
from extproc.server.metrics import Metrics

log = logging.getLogger("extproc.runtime.reload")
POLL_SECONDS = 1.0
SETTLE_SECONDS = 0.1  # a change counts once two reads this far apart agree (no half-written keys)


def _restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Settings a running processor cannot take over without a restart."""
    fields = [("extproc", old.extproc, new.extproc), ("admin", old.admin, new.admin),
              ("metrics", old.metrics, new.metrics), ("metering", old.metering, new.metering),
              ("limits.store", _store(old), _store(new))]  # fmt: skip
    return [f"{name}: changing it needs a restart" for name, a, b in fields if a != b]


def _store(config: GatewayConfig) -> object:
    limits = config.limits
    return limits and (limits.store, limits.password, limits.sync_ms)


class PolicyHolder:
    """The one place the current policy lives; a load swaps it as a single reference."""

    def __init__(
        self,
        config_path: Path,
        metrics: Metrics,
        environ: Mapping[str, str] = os.environ,
        on_loaded: Callable[[GatewayConfig], None] | None = None,
        socket: Path | None = None,
    ) -> None:
        self.config_path = config_path
        self._socket = socket  # overrides extproc.socket (``up``'s private socket)
        self._metrics = metrics
        self._environ = environ
        self._on_loaded = on_loaded  # hands Envoy the new routes; raises OSError if it cannot
        self._lock = threading.Lock()  # one load at a time (watcher, SIGHUP)
        self._policy: Policy | None = None
        self._delivered: Policy | None = None  # the routes Envoy has been given
        self.config: GatewayConfig | None = None  # the config the current policy came from
        # The watched files as the last load (good or bad) began: the watcher skips a change
        # a SIGHUP has loaded already, instead of loading it a second time.
        self.attempted: bytes = b""

    @property
    def policy(self) -> Policy:
        policy = self._policy
        assert policy is not None, "load() before serving"
        return policy

    def load(self) -> bool:
        """Load config + secrets; on failure keep the last good policy and report why."""
        with self._lock:
            self.attempted = fingerprint(self.watched_files())
            try:
                config = load_config(self.config_path).with_socket(self._socket)
                if self.config is not None and (
                    problems := _restart_only_changes(self.config, config)
                ):
                    raise ConfigError(f"{self.config_path.name}: {p}" for p in problems)
                policy = compile_policy(config, self._environ, self._delivered)
                # The processor learns the new route names before Envoy can route by them,
                # and keeps the names Envoy has now, for requests it routed by them.
                self._swap(config, policy)
                if self._on_loaded is not None:
                    self._on_loaded(config)
            except (ConfigError, OSError) as exc:
                self._failed(exc.problems if isinstance(exc, ConfigError) else (str(exc),))
                return False
            self._delivered = policy
            self._metrics.loaded(policy.version, ok=True)
            self._log_loaded(config, policy)
            return True

    def _swap(self, config: GatewayConfig, policy: Policy) -> None:
        known = {} if self._delivered is None else dict(self._delivered.routes)
        self._policy = replace(policy, routes=MappingProxyType({**known, **policy.routes}))
        self.config = config

    def _failed(self, problems: Sequence[str]) -> None:
        self._metrics.loaded("", ok=False)
        kept = "keeping the last good config" if self._delivered else "nothing to serve"
        log.error("config not loaded (%s):\n  %s", kept, "\n  ".join(problems))

    @staticmethod
    def _log_loaded(config: GatewayConfig, policy: Policy) -> None:
        for warning in warnings(config):
            log.warning("%s", warning)
        for route in policy.missing_optional:
            log.warning(
                "route %s: optional secret not set; credential-less requests get 401", route
            )
        log.info("config %s loaded: %d route(s)", policy.version, len(policy.routes))

    def watched_files(self) -> list[Path]:
        """The YAML, and the secret and keys files of the current config."""
        files = [self.config_path]
        for route in self.config.routes if self.config else ():
            secret = route.credential and route.credential.secret
            if secret and secret.file:
                files.append(secret.file)
            if route.access:
                files.append(route.access.keys_file)
        return sorted(set(files))


def fingerprint(files: list[Path]) -> bytes:
    """A digest of the files' bytes (following symlinks, as Kubernetes swaps ``..data``)."""
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError as exc:
            digest.update(f"{path}: {exc.errno}".encode())
    return digest.digest()


def watch(
    holder: PolicyHolder,
    stop: threading.Event,
    load: Callable[[], bool] | None = None,
    interval: float = POLL_SECONDS,
) -> None:
    """Poll the watched files until ``stop``; call ``load`` once per settled change.

    Polling (not inotify) sees symlink swaps and files on any volume type. A
    broken change is reported once; the next change is tried again.
    """
    load = load or holder.load
    seen = fingerprint(holder.watched_files())
    while not stop.wait(interval):
        current = fingerprint(holder.watched_files())
        if current == seen:
            continue
        stop.wait(SETTLE_SECONDS)
        settled = fingerprint(holder.watched_files())
        if settled != current:
            continue  # still being written: look again next round
        if settled != holder.attempted:  # else a SIGHUP has loaded this very change already
            load()
        # Not re-read: an edit made while loading must still count as a change next round.
        seen = settled
