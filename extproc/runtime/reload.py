"""Live reload: the current policy, how a new one replaces it, and the file watcher.

A reload is a transaction. The new config is staged (YAML validated, every
secret and keys file read, the policy compiled); then, while the processor
knows the route names of both configs (the old config's answers for names in
both), Envoy is handed the new files and must confirm it took them
(``xds.XdsWriter``); only then is the new policy committed. If staging fails
nothing changes; if delivery fails the processor goes back to the last good
policy, the files Envoy had are written back, the failure is logged once and
the load is tried again after a growing delay (``RETRY_FIRST_S`` doubling up to
``RETRY_MAX_S``), so the change is not lost.

The watcher thread cannot die: an unexpected error in a round is logged,
counted in ``gateway_config_watch_errors_total`` and the next round runs. Each
round leaves a heartbeat (``PolicyHolder.watched_at``) for health to see a
stuck watcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from extproc.config.files import FileProblem, read_bounded
from extproc.config.load import load_config, warnings
from extproc.config.model import GatewayConfig
from extproc.config.sections import ConfigError
from extproc.policy.compiled import Policy, compile_policy
from extproc.runtime.xds import DeliveryError
from extproc.server.metrics import Metrics

log = logging.getLogger("extproc.runtime.reload")
POLL_SECONDS = 1.0
# Larger than any file a load accepts (keys files: 64 MiB), so every real edit is seen.
WATCH_LIMIT = 65 * 2**20
SETTLE_SECONDS = 0.1  # a change counts once two reads this far apart agree (no half-written keys)
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


# Settings a running processor cannot take over without a restart: the name a refused
# reload gives, and the config attributes it covers (docs/configuration.md marks them).
RESTART_ONLY: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "extproc": ("extproc",),
    "admin": ("admin",),
    "metrics": ("metrics",),
    "metering": ("metering",),
    "limits.store": ("limits.store", "limits.password", "limits.sync_ms"),
})  # fmt: skip


def _restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Settings a running processor cannot take over without a restart."""
    return [
        f"{name}: changing it needs a restart"
        for name, paths in RESTART_ONLY.items()
        if [_attribute(old, p) for p in paths] != [_attribute(new, p) for p in paths]
    ]


def _attribute(config: GatewayConfig, path: str) -> object:
    """``limits.store`` of ``config``; None where a section on the way is absent."""
    value: object = config
    for name in path.split("."):
        value = getattr(value, name, None) if value is not None else None
    return value


class Retry:
    """When a load whose delivery failed is tried again: 1 s, 2 s, 4 s, … up to 30 s."""

    def __init__(self) -> None:
        self.due: float | None = None  # monotonic time of the next try; None: nothing to retry
        self._delay_s = RETRY_FIRST_S / 2

    def failed(self, now: float) -> float:
        self._delay_s = min(RETRY_MAX_S, self._delay_s * 2)
        self.due = now + self._delay_s
        return self._delay_s

    def clear(self) -> None:
        self.due = None
        self._delay_s = RETRY_FIRST_S / 2


# Hands Envoy the config (and its policy version) and returns once Envoy took it;
# raises DeliveryError or OSError if it did not.
Deliver = Callable[[GatewayConfig, str], None]


class PolicyHolder:
    """The one place the current policy lives; a load swaps it as a single reference."""

    def __init__(
        self,
        config_path: Path,
        metrics: Metrics,
        environ: Mapping[str, str] = os.environ,
        on_loaded: Deliver | None = None,
        socket: Path | None = None,
    ) -> None:
        self.config_path = config_path
        self._socket = socket  # overrides extproc.socket (``up``'s private socket)
        self.metrics = metrics
        self._environ = environ
        self._on_loaded = on_loaded
        self._lock = threading.Lock()  # one load at a time (watcher, SIGHUP)
        self._policy: Policy | None = None
        self._delivered: Policy | None = None  # the committed policy (Envoy has its routes)
        self.config: GatewayConfig | None = None  # the config the current policy came from
        # The watched files as the last load (good or bad) began: the watcher skips a change
        # a SIGHUP has loaded already, instead of loading it a second time.
        self.attempted: bytes = b""
        self.retry = Retry()
        self._logged: Sequence[str] = ()  # the problems last logged
        self.last_ok = False  # the last load committed its config
        self.watched_at = time.monotonic()  # the watcher's last round (its heartbeat)

    @property
    def policy(self) -> Policy:
        policy = self._policy
        assert policy is not None, "load() before serving"
        return policy

    def load(self) -> bool:
        """Stage, deliver, commit; on failure keep (or go back to) the last good policy."""
        with self._lock:
            self.attempted = fingerprint(self.watched_files())
            try:
                config, policy = self._stage()
            except ConfigError as exc:
                self.retry.clear()  # a broken file is not retried: its next change is loaded
                self._failed(exc.problems)
                return False
            try:
                self._deliver(config, policy)
            except (DeliveryError, OSError) as exc:
                wait_s = self.retry.failed(time.monotonic())
                self._failed((f"config {policy.version} not delivered: {exc}",), wait_s)
                return False
            self.retry.clear()
            self._logged = ()
            self._swap(config, policy)
            self._delivered = policy
            self.last_ok = True
            self.metrics.loaded(policy.version, ok=True)
            self._log_loaded(config, policy)
            return True

    def _stage(self) -> tuple[GatewayConfig, Policy]:
        config = load_config(self.config_path).with_socket(self._socket)
        if self.config is not None and (problems := _restart_only_changes(self.config, config)):
            raise ConfigError(f"{self.config_path.name}: {p}" for p in problems)
        return config, compile_policy(config, self._environ, self._delivered)

    def _deliver(self, config: GatewayConfig, policy: Policy) -> None:
        """Hand Envoy the new config while the processor knows both configs' route names.

        For a name in both, the old config's answer holds until Envoy confirmed;
        a name only the new config has is answered by it (Envoy may route by it
        as soon as it read the file). A failure restores the policy as it was.
        """
        if self._on_loaded is None:
            return
        before = self._policy
        if before is not None:
            both = {**policy.routes, **before.routes}
            self._policy = replace(before, routes=MappingProxyType(both))
        try:
            self._on_loaded(config, policy.version)
        except BaseException:
            self._policy = before
            raise

    def _swap(self, config: GatewayConfig, policy: Policy) -> None:
        known = {} if self._delivered is None else dict(self._delivered.routes)
        self._policy = replace(policy, routes=MappingProxyType({**known, **policy.routes}))
        self.config = config

    def _failed(self, problems: Sequence[str], retry_s: float | None = None) -> None:
        self.last_ok = False
        self.metrics.loaded("", ok=False)
        kept = "keeping the last good config" if self._delivered else "nothing to serve"
        again = f"; trying again in {retry_s:.0f}s" if retry_s else ""
        # A retry that fails the same way is not logged again (it would every 30 s).
        level = logging.DEBUG if retry_s and problems == self._logged else logging.ERROR
        log.log(level, "config not loaded (%s%s):\n  %s", kept, again, "\n  ".join(problems))
        self._logged = problems

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
        try:  # bounded: a FIFO or a huge file must not hang the watcher or fill memory
            digest.update(hashlib.sha256(read_bounded(path, WATCH_LIMIT, "file")).digest())
        except FileProblem as exc:  # unusable now: its size and time still tell a change
            digest.update(f"{exc} {_stamp(path)}".encode())
    return digest.digest()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def watch(
    holder: PolicyHolder,
    stop: threading.Event,
    load: Callable[[], bool] | None = None,
    interval: float = POLL_SECONDS,
) -> None:
    """Poll the watched files until ``stop``; call ``load`` once per settled change.

    Polling (not inotify) sees symlink swaps and files on any volume type. A
    broken change is reported once; the next change is tried again. A load
    whose delivery failed is tried again when ``holder.retry`` says so. No
    error ends the loop: one is logged with its traceback, counted, and the
    next round starts afresh.
    """
    load = load or holder.load
    seen: bytes | None = None
    while not stop.wait(0 if seen is None else interval):
        holder.watched_at = time.monotonic()
        try:
            seen = _round(holder, stop, load, seen)
        except Exception:  # the one place a bug must not stop reloads
            log.exception("config watcher: unexpected error; watching on")
            holder.metrics.watch_errors.inc()
            seen = seen or b""


def _round(
    holder: PolicyHolder, stop: threading.Event, load: Callable[[], bool], seen: bytes | None
) -> bytes:
    """One look at the files; returns the fingerprint that counts as seen."""
    current = fingerprint(holder.watched_files())
    if seen is None:
        return current  # the first look: what the last load read
    due = holder.retry.due
    if current == seen:
        if due is not None and time.monotonic() >= due:
            load()
        return seen
    stop.wait(SETTLE_SECONDS)
    settled = fingerprint(holder.watched_files())
    if settled != current:
        return seen  # still being written: look again next round
    if settled != holder.attempted or due is not None:  # else a SIGHUP loaded it already
        load()
    # Not re-read: an edit made while loading must still count as a change next round.
    return settled
