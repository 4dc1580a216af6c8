"""One measured wrk run against one target: throughput, latency, CPU and memory per request.

CPU per request is read from /proc around the loaded run (see procstat), so
it is what each process really burnt; "other CPU" is the rest of the machine
meanwhile, the noise to read the figures against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import procstat
import topology
import wrkload
from report import Sample
from topology import Service, Topology

API_PATH = topology.API_PREFIX + "v1/messages"
EXTPROC_STREAMS = "http.gateway.ext_proc.streams_started"
# The decision filter's streams go to the "extproc" cluster, the usage records (Envoy's gRPC
# access log, metering: true) to "extproc_accesslog" (same processor, a few streams held
# open): open streams, records handed to the logger, records dropped, and streams refused by
# a cluster's circuit breaker.
EXTPROC_ACTIVE = "cluster.extproc.upstream_rq_active"
METERING_SENT = "cluster.extproc_accesslog.upstream_cx_tx_bytes_total"
METERING_STREAMS = "access_logs.grpc_access_log.logs_written"
METERING_LOST = "access_logs.grpc_access_log.logs_dropped"
OVERFLOW = ("upstream_rq_pending_overflow", "upstream_rq_active_overflow")
EXTPROC_OVERFLOW = tuple(f"cluster.extproc.{name}" for name in OVERFLOW)
METERING_OVERFLOW = tuple(f"cluster.extproc_accesslog.{name}" for name in OVERFLOW)


@dataclass(frozen=True)
class _Snapshot:
    """Counters read right before and right after a wrk run."""

    cpu_s: dict[str, float]  # per watched process tree
    rss_bytes: int  # the processor tree's
    extproc_calls: int  # streams the gateway opened to the processor so far
    metering_calls: int  # usage records Envoy's gRPC access log took (metering: true)
    metering_lost: int  # usage records it dropped (stream backed up or away)
    metering_overflow: int  # access-log streams refused by their cluster's circuit breaker
    extproc_overflow: int  # decision streams refused by theirs
    busy_s: float  # the whole machine's busy CPU
    ours_s: float  # our services' CPU plus finished wrk runs'


def _snapshot(topo: Topology, target: Service) -> _Snapshot:
    watched = {"envoy": target.pid, "processor": topo.processor.pid, "upstream": topo.upstream.pid}
    usage = {name: procstat.usage(pid) for name, pid in watched.items()}
    ours = sum(procstat.usage(s.pid).cpu_s for s in topo.services()) + procstat.children_cpu_s()
    stats = topo.gateway.stats()
    return _Snapshot(
        cpu_s={name: u.cpu_s for name, u in usage.items()},
        rss_bytes=usage["processor"].rss_bytes,
        extproc_calls=stats.get(EXTPROC_STREAMS, 0),
        metering_calls=stats.get(METERING_STREAMS, 0),
        metering_lost=stats.get(METERING_LOST, 0),
        metering_overflow=sum(stats.get(name, 0) for name in METERING_OVERFLOW),
        extproc_overflow=sum(stats.get(name, 0) for name in EXTPROC_OVERFLOW),
        busy_s=procstat.machine_busy_s(),
        ours_s=ours,
    )


def settle(topo: Topology, deadline_s: float = 15.0) -> None:
    """Wait until the gateway has no decision stream open and has sent its last usage records.

    Envoy flushes the records every ``metering_flush_ms`` (250 ms); waiting until its bytes
    to the processor stop growing for longer than that, before each snapshot, puts all of a
    run's work (the processor reading its records) in its own window.
    """
    end = time.monotonic() + deadline_s
    sent = -1.0
    while time.monotonic() < end:
        stats = topo.gateway.stats()
        now = stats.get(METERING_SENT, 0)
        if not stats.get(EXTPROC_ACTIVE, 0) and now == sent:
            return
        sent = now
        time.sleep(0.4)


def measure(topo: Topology, wrk: str, target: Service, script: Path, duration: float) -> Sample:
    """wrk at 32 connections (throughput, latency, CPU per request), then at 1 (p50)."""
    settle(topo)
    before = _snapshot(topo, target)
    started = time.monotonic()
    loaded = wrkload.run(wrk, script, target.url(API_PATH), 32, duration)
    settle(topo)
    after = _snapshot(topo, target)
    window = time.monotonic() - started
    single = wrkload.run(wrk, script, target.url(API_PATH), 1, duration)
    count = max(loaded.requests, 1)

    def cpu_us(name: str) -> float:
        return (after.cpu_s[name] - before.cpu_s[name]) / count * 1e6

    others = (after.busy_s - before.busy_s) - (after.ours_s - before.ours_s)
    return Sample(
        rps=loaded.rps,
        p50_ms=loaded.p50_ms,
        p99_ms=loaded.p99_ms,
        p50_c1_ms=single.p50_ms,
        envoy_us=cpu_us("envoy"),
        processor_us=cpu_us("processor"),
        upstream_us=cpu_us("upstream"),
        processor_rss_mb=after.rss_bytes / 2**20,
        extproc_calls=(after.extproc_calls - before.extproc_calls) / count,
        errors=loaded.errors + single.errors,
        other_cpu_pct=max(0.0, others) / window * 100,
        metering_calls=(after.metering_calls - before.metering_calls) / count,
        metering_lost=after.metering_lost - before.metering_lost,
        metering_overflow=after.metering_overflow - before.metering_overflow,
        extproc_overflow=after.extproc_overflow - before.extproc_overflow,
    )
