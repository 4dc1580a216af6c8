"""Prometheus metrics, in a registry of our own (no module-level state).

Labels are route names, outcomes and results only: never a header value, a
client credential or a secret. With ``extproc.workers`` > 1 every worker
writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
multiprocess mode) and the supervising process serves their sum. Gauges use
the ``live*`` modes: the supervisor calls ``worker_died`` for a dead worker, so
its last values leave the sum at once.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from extproc.config.model import Endpoint
from extproc.policy.decision import Outcome
from extproc.policy.limits import LimitTable
from extproc.policy.processor import Answer
from extproc.usage.record import UsageRecord

OTHER_CLIENTS = "(other)"  # not a client name: names start with a letter or digit
_MODEL = re.compile(r"^[A-Za-z0-9._:@/-]{1,80}$")  # a model as a label: bounded, printable


class Metrics:
    """The processor's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._version = ""
        self._decision_children: dict[tuple[str, Outcome, str], Counter] = {}
        self._limits: LimitTable | None = None
        self._labelled: frozenset[str] = frozenset()  # clients with a series of their own
        self._relabelling = threading.Lock()
        self.decisions = Counter(
            "gateway_decisions",
            "Credential decisions made by the processor, by route, outcome and gateway-key "
            f"client (clients without limits of their own: {OTHER_CLIENTS}).",
            ["route", "outcome", "client"],
            registry=self.registry,
        )
        self.processing_seconds = Histogram(
            "gateway_processing_seconds",
            "Time to answer one ext_proc request-headers message.",
            buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3),
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Config (and secret) loads, by result.",
            ["result"],
            registry=self.registry,
        )
        self.config_info = Gauge(
            "gateway_config_info",
            "1 for the config version being served.",
            ["version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.config_last_reload_ok = Gauge(
            "gateway_config_last_reload_success",
            "1 if the last config load succeeded; 0 if the last good config is kept.",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.watch_errors = Counter(
            "gateway_config_watch_errors",
            "Unexpected errors in the config watcher (each logged); it keeps watching.",
            registry=self.registry,
        )

        self._usage_children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}
        self.usage_requests = Counter(
            "gateway_usage_requests",
            "Usage records of finished requests on metered routes, by who paid and whether the "
            "provider reported token usage (tokens: known or unknown, never guessed); clients "
            f"without limits of their own: {OTHER_CLIENTS}.",
            ["route", "client", "credential_source", "model", "tokens"],
            registry=self.registry,
        )
        self.usage_tokens = Counter(
            "gateway_usage_tokens",
            "Tokens the provider reported, by type (input, output, cache_creation, cache_read).",
            ["route", "client", "credential_source", "model", "type"],
            registry=self.registry,
        )
        self.usage_incomplete = Counter(
            "gateway_usage_incomplete",
            "Streams cut before their final usage: input and cache as reported, output as seen.",
            ["route"],
            registry=self.registry,
        )
        self.usage_unreadable = Counter(
            "gateway_usage_records_unreadable",
            "Access-log entries (or batches) from Envoy that could not be read as usage records.",
            registry=self.registry,
        )
        self.usage_meter_errors = Counter(
            "gateway_usage_meter_errors",
            "Responses on which Envoy's Lua meter failed (the response passed; its usage from "
            "there on is not counted).",
            registry=self.registry,
        )
        self.limits_store_up = Gauge(
            "gateway_limits_store_up",
            "0 while the shared limits store cannot be synced (limits count locally); "
            "1 otherwise, and always 1 with store: memory (nothing shared to lose).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.limits_sync_failures = Counter(
            "gateway_limits_sync_failures",
            "Limits-store syncs that failed (store unreachable, or a bug: the log says which).",
            registry=self.registry,
        )
        self.limits_lost = Counter(
            "gateway_limits_counts_lost",
            "Counts not kept while the limits store was away (beyond the pending bound).",
            registry=self.registry,
        )

    def usage(self, record: UsageRecord, limits: LimitTable | None) -> None:
        """One finished request's usage record; ``limits`` (the policy's) bound the client
        label as for decisions."""
        if limits is not self._limits:
            self._relabel(limits)
        model = record.model if _MODEL.match(record.model) else "unknown"
        client = self.client_label(record.client)
        labels = (record.route, client, record.credential_source, model)
        known = "known" if record.known else "unknown"
        self._usage_child(self.usage_requests, (*labels, known)).inc()
        kinds = (
            ("input", record.input),
            ("output", record.output),
            ("cache_creation", record.cache_creation),
            ("cache_read", record.cache_read),
        )
        for kind, count in kinds:
            if count:
                self._usage_child(self.usage_tokens, (*labels, kind)).inc(count)
        if not record.complete:
            self.usage_incomplete.labels(record.route).inc()

    def _usage_child(self, counter: Counter, labels: tuple[str, ...]) -> Counter:
        """``labels()`` is a locked lookup: children are cached, as for decisions."""
        key = (counter, labels)
        child = self._usage_children.get(key)
        if child is None:
            child = self._usage_children[key] = counter.labels(*labels)
        return child

    def unreadable(self, count: int) -> None:
        self.usage_unreadable.inc(count)

    def meter_errors(self, count: int) -> None:
        self.usage_meter_errors.inc(count)

    def store_synced(self, ok: bool, lost: int) -> None:
        """One limits-store sync (or, with ``store: memory``, the one report that all is well)."""
        self.limits_store_up.set(1 if ok else 0)
        if not ok:
            self.limits_sync_failures.inc()
        if lost:
            self.limits_lost.inc(lost)

    def decided(self, answer: Answer, seconds: float, limits: LimitTable | None = None) -> None:
        """Count one decision; label children are cached (``labels()`` is a locked lookup).

        ``limits`` is the policy's limit table: a new one (a reload) sets which clients
        have series of their own.
        """
        assert answer.outcome is not None
        if limits is not self._limits:
            self._relabel(limits)
        key = (answer.route, answer.outcome, self.client_label(answer.client))
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(
                key[0], key[1].value, key[2]
            )
        child.inc()
        self.processing_seconds.observe(seconds)

    def client_label(self, client: str) -> str:
        """The ``client`` label: a client's own name only if it has limits of its own.

        Those are named in the config, so they bound the series; every other gateway
        client shares ``OTHER_CLIENTS`` (per-person detail belongs in the spend ledger).
        """
        return client if not client or client in self._labelled else OTHER_CLIENTS

    def _relabel(self, limits: LimitTable | None) -> None:
        """Take a new limit table's clients; forget (and drop the series of) the others."""
        with self._relabelling:
            if limits is self._limits:
                return
            self._labelled = frozenset(limits.clients) if limits else frozenset()
            for key in list(self._decision_children):
                if key[2] != self.client_label(key[2]):
                    del self._decision_children[key]
                    self.decisions.remove(key[0], key[1].value, key[2])
            for counter, labels in list(self._usage_children):
                if labels[1] != self.client_label(labels[1]):
                    del self._usage_children[(counter, labels)]
                    counter.remove(*labels)
            self._limits = limits

    def loaded(self, version: str, ok: bool) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()
        self.config_last_reload_ok.set(1 if ok else 0)
        if ok and version != self._version:
            if self._version:  # 0, not removed: other workers' files may still hold a 1 for it
                self.config_info.labels(self._version).set(0)
            self.config_info.labels(version).set(1)
            self._version = version

    def serve(self, endpoint: Endpoint) -> None:
        """Expose ``/metrics`` on ``endpoint`` from a daemon thread."""
        start_http_server(endpoint.port, endpoint.address, registry=self.registry)


def serve_workers(endpoint: Endpoint, directory: Path) -> None:
    """Expose the sum of the metrics that worker processes write to ``directory``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    start_http_server(endpoint.port, endpoint.address, registry=registry)


def worker_died(pid: int, directory: Path) -> None:
    """Drop a dead worker's gauge values from the sum (its counters stay: they happened)."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
