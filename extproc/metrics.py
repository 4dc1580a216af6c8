"""Prometheus metrics, in a registry of our own (no module-level state).

Labels are route names, outcomes and results only: never a header value, a
client credential or a secret.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from extproc.model import Endpoint
from extproc.processor import Answer


class Metrics:
    """The processor's metrics; children for known label sets are cached per policy."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "gateway_decisions",
            "Credential decisions made by the processor, by route, outcome and gateway-key client.",
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
        )
        self.config_last_reload_ok = Gauge(
            "gateway_config_last_reload_success",
            "1 if the last config load succeeded; 0 if the last good config is kept.",
            registry=self.registry,
        )

    def decided(self, answer: Answer, seconds: float) -> None:
        assert answer.outcome is not None
        self.decisions.labels(answer.route, answer.outcome.value, answer.client).inc()
        self.processing_seconds.observe(seconds)

    def loaded(self, version: str, ok: bool) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()
        self.config_last_reload_ok.set(1 if ok else 0)
        if ok:
            self.config_info.clear()
            self.config_info.labels(version).set(1)

    def serve(self, endpoint: Endpoint) -> None:
        """Expose ``/metrics`` on ``endpoint`` from a daemon thread."""
        start_http_server(endpoint.port, endpoint.address, registry=self.registry)
