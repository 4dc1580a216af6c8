"""Turn the measurements into one Markdown report (printed and saved) and a JSON twin.

Each figure in the load table is the median over the runs; ratios and deltas
compare the gateway with the bare Envoy measured in the same alternation.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLIENT = "(a) client credential"
INJECT = "(b) injection"
MIX = "(c) 50/50 mix"
BASELINE = "bare Envoy"
GATEWAY = "gateway"
TTFB_DIRECT = "direct to upstream"
TTFB_INJECTED = "gateway, injected"
STREAMS_HELD = "ext_proc gRPC streams open (max while held)"
STREAMS_RSS = "processor RSS MB (streams held)"
EVENT_PROCESSOR_US = "processor CPU µs per SSE event (streams held)"
EVENT_ENVOY_US = "gateway Envoy CPU µs per SSE event (streams held)"


@dataclass(frozen=True)
class Sample:
    """One run of one target: wrk at 32 connections, then at 1."""

    rps: float
    p50_ms: float
    p99_ms: float
    p50_c1_ms: float
    envoy_us: float  # CPU of the Envoy under test, per request at 32 connections
    processor_us: float  # CPU of the processor (its whole process tree), per request
    upstream_us: float  # CPU of the direct-response Envoy, per request (for context)
    processor_rss_mb: float
    extproc_calls: float  # ext_proc streams Envoy opened, per request
    errors: int
    other_cpu_pct: float  # CPU used by other processes on the machine meanwhile (noise)
    metering_calls: float = 0.0  # usage records Envoy's access log took, per request
    metering_lost: int = 0  # usage records it dropped
    metering_overflow: int = 0  # access-log streams refused by extproc_accesslog's breaker
    extproc_overflow: int = 0  # decision streams refused by the extproc circuit breaker


@dataclass
class Row:
    scenario: str
    target: str  # BASELINE or GATEWAY
    samples: list[Sample] = field(default_factory=list)

    def median(self, name: str) -> float:
        """The median over the runs of one ``Sample`` field."""
        return float(statistics.median(getattr(s, name) for s in self.samples))


@dataclass
class Report:
    meta: dict[str, Any]
    rows: list[Row]
    ttfb: dict[str, dict[str, float]] = field(default_factory=dict)
    streams: dict[str, float] = field(default_factory=dict)

    def pair(self, scenario: str) -> tuple[Row, Row]:
        found = {r.target: r for r in self.rows if r.scenario == scenario}
        return found[BASELINE], found[GATEWAY]


@dataclass
class ClientScale:
    """One gateway-client count: the load samples, in-process timings and reload times."""

    clients: int
    identify_us: float  # GatewayKeys.identify per call, in-process
    load_s: float  # load the YAML + compile the policy, in-process
    keys_reload_s: float  # the same after one key is appended (previous policy given)
    idle_cpu_ms_s: float = 0.0  # the idle processor's CPU, ms per second (file polling)
    samples: list[Sample] = field(default_factory=list)
    reload_s: list[float] = field(default_factory=list)  # key appended → served (watcher)

    def median(self, name: str) -> float:
        return float(statistics.median(getattr(s, name) for s in self.samples))

    def best(self, name: str) -> float:
        """The lowest run: background load only ever adds CPU time and latency."""
        return float(min(getattr(s, name) for s in self.samples))


@dataclass
class RouteScale:
    """One route count: render and write times, and reload times after adding a route."""

    routes: int
    envoy_routes: int  # routes in the rendered rds.yaml
    xds_kb: float  # the three xDS files
    render_s: float  # `python -m extproc render CONFIG -o FILE` (a new interpreter)
    render_xds_s: float  # the same with --xds-dir (bootstrap and the xDS files)
    load_s: float  # load the YAML + compile the policy, in-process
    xds_write_s: float  # XdsWriter.write, in-process
    reload_s: list[float] = field(default_factory=list)  # route added → served (watcher)
    reload_envoy_s: list[float] = field(default_factory=list)  # rds.yaml replaced → served


@dataclass
class ScaleReport:
    meta: dict[str, Any]
    clients: list[ClientScale]
    routes: list[RouteScale]


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def load_table(report: Report) -> list[str]:
    metering = bool(report.meta.get("metering"))
    header: tuple[str, ...] = (
        "scenario", "target", "req/s", "ratio", "p50 ms", "p99 ms", "p50 ms @1 conn",
        "Δp50 @1 ms", "Envoy µs/req", "processor µs/req", "processor RSS MB",
        "ext_proc calls/req", "errors", "other CPU %",
    )  # fmt: skip
    if metering:
        header += ("records/req", "records dropped", "overflow (decision/access log)")
    lines = []
    for scenario in dict.fromkeys(r.scenario for r in report.rows):
        base, gateway = report.pair(scenario)
        for row in (base, gateway):
            is_gateway = row is gateway
            line: tuple[str, ...] = (
                scenario,
                row.target,
                f"{row.median('rps'):,.0f}",
                f"{row.median('rps') / base.median('rps'):.2f}",
                _ms(row.median("p50_ms")),
                _ms(row.median("p99_ms")),
                _ms(row.median("p50_c1_ms")),
                f"{row.median('p50_c1_ms') - base.median('p50_c1_ms'):+.3f}",
                f"{row.median('envoy_us'):.1f}",
                f"{row.median('processor_us'):.1f}" if is_gateway else "—",
                f"{row.median('processor_rss_mb'):.1f}" if is_gateway else "—",
                f"{row.median('extproc_calls'):.2f}" if is_gateway else "—",
                str(sum(s.errors for s in row.samples)),
                f"{row.median('other_cpu_pct'):.0f}",
            )
            if metering:
                lost = sum(s.metering_lost for s in row.samples)
                calls = f"{row.median('metering_calls'):.2f}"
                overflow = (
                    f"{sum(s.extproc_overflow for s in row.samples)}"
                    f"/{sum(s.metering_overflow for s in row.samples)}"
                )
                line += (calls, str(lost), overflow) if is_gateway else ("—", "—", "—")
            lines.append(line)
    return _table(header, lines)


def sse_table(report: Report) -> list[str]:
    direct = report.ttfb[TTFB_DIRECT]
    lines = [
        (
            name,
            _ms(t["first_byte_ms"]),
            _ms(t["first_event_ms"]),
            f"{t['first_event_ms'] - direct['first_event_ms']:+.3f}",
            _ms(t["event_lag_ms"]),
            f"{t['event_lag_ms'] - direct['event_lag_ms']:+.3f}",
        )
        for name, t in report.ttfb.items()
    ]
    header = (
        "path", "first byte ms", "first event ms", "Δ first event vs direct ms",
        "event lag ms", "Δ event lag vs direct ms",
    )  # fmt: skip
    return _table(header, lines)


def streams_table(report: Report) -> list[str]:
    return _table(("measure", "value"), [(k, f"{v:g}") for k, v in report.streams.items()])


def targets(report: Report) -> list[tuple[str, str, bool]]:
    """The issue's targets: (what, measured, met)."""
    checks: list[tuple[str, str, bool]] = []
    names = {r.scenario for r in report.rows}
    if CLIENT in names:
        base, gw = report.pair(CLIENT)
        ratio = gw.median("rps") / base.median("rps")
        delta = gw.median("p50_c1_ms") - base.median("p50_c1_ms")
        checks.append(("(a) throughput ≥ 0.90x bare Envoy", f"{ratio:.2f}x", ratio >= 0.90))
        checks.append(("(a) p50 @1 conn ≤ bare + 0.1 ms", f"{delta:+.3f} ms", delta <= 0.1))
    if INJECT in names:
        base, gw = report.pair(INJECT)
        cpu = gw.median("processor_us")
        ratio = gw.median("rps") / base.median("rps")
        delta = gw.median("p50_c1_ms") - base.median("p50_c1_ms")
        checks.append(("(b) processor CPU ≤ 150 µs/req", f"{cpu:.0f} µs", cpu <= 150))
        checks.append(("(b) throughput ≥ 0.25x bare Envoy", f"{ratio:.2f}x", ratio >= 0.25))
        checks.append(("(b) p50 @1 conn ≤ bare + 0.5 ms", f"{delta:+.3f} ms", delta <= 0.5))
    if report.ttfb:
        gw_event = report.ttfb[TTFB_INJECTED]["first_event_ms"]
        delta = gw_event - report.ttfb[TTFB_DIRECT]["first_event_ms"]
        checks.append(("SSE first event ≤ direct + 1 ms", f"{delta:+.3f} ms", delta <= 1.0))
    if report.streams:
        held = report.streams[STREAMS_HELD]
        rss = report.streams[STREAMS_RSS]
        checks.append(("SSE streams hold no processor stream", f"{held:g} open", held == 0))
        checks.append(("processor RSS ≤ 80 MB with the streams", f"{rss:.1f} MB", rss <= 80))
    return checks


def _reloads(values: list[float]) -> str:
    """Median (max) of the reload times, in seconds."""
    if not values:
        return "—"
    return f"{statistics.median(values):.2f} ({max(values):.2f})"


def clients_table(report: ScaleReport) -> list[str]:
    header = (
        "gateway clients", "processor µs/req, median (best)", "p50 ms @1 conn, median (best)",
        "p50 ms @32", "req/s",
        "processor RSS MB", "idle CPU ms/s", "identify µs (in-process)",
        "load + compile ms", "keys-only recompile ms", "reload s", "errors", "other CPU %",
    )  # fmt: skip
    lines = [
        (
            f"{row.clients:,}",
            f"{row.median('processor_us'):.1f} ({row.best('processor_us'):.1f})",
            f"{_ms(row.median('p50_c1_ms'))} ({_ms(row.best('p50_c1_ms'))})",
            _ms(row.median("p50_ms")),
            f"{row.median('rps'):,.0f}",
            f"{row.median('processor_rss_mb'):.1f}",
            f"{row.idle_cpu_ms_s:.1f}",
            f"{row.identify_us:.2f}",
            f"{row.load_s * 1000:.0f}",
            f"{row.keys_reload_s * 1000:.0f}",
            _reloads(row.reload_s),
            str(sum(s.errors for s in row.samples)),
            f"{row.median('other_cpu_pct'):.0f}",
        )
        for row in report.clients
    ]
    return _table(header, lines)


def routes_table(report: ScaleReport) -> list[str]:
    header = (
        "routes", "Envoy routes", "xDS files KB", "render s", "render --xds-dir s",
        "load + compile s (in-process)", "xDS write s (in-process)", "reload s",
        "of which Envoy s",
    )  # fmt: skip
    lines = [
        (
            f"{row.routes:,}",
            f"{row.envoy_routes:,}",
            f"{row.xds_kb:,.0f}",
            f"{row.render_s:.2f}",
            f"{row.render_xds_s:.2f}",
            f"{row.load_s:.2f}",
            f"{row.xds_write_s:.2f}",
            _reloads(row.reload_s),
            _reloads(row.reload_envoy_s),
        )
        for row in report.routes
    ]
    return _table(header, lines)


def scale_targets(report: ScaleReport) -> list[tuple[str, str, bool]]:
    """Issue 13's targets: (what, measured, met)."""
    checks: list[tuple[str, str, bool]] = []
    rows = report.clients
    if len(rows) < 2:
        return checks
    first, last = rows[0], rows[-1]
    for name, label in (("processor_us", "processor µs/req"), ("p50_c1_ms", "p50 @1 conn")):
        # Judged on each count's best run (the least disturbed); medians shown beside.
        best = [row.best(name) / first.best(name) - 1 for row in rows[1:]]
        median = [row.median(name) / first.median(name) - 1 for row in rows[1:]]
        checks.append(
            (
                f"{label}: every count within ±10 % of {first.clients:,} clients (best runs)",
                ", ".join(f"{v:+.0%}" for v in best)
                + " (medians: "
                + ", ".join(f"{v:+.0%}" for v in median)
                + ")",
                max(abs(v) for v in best) <= 0.10,
            )
        )
    added = last.median("processor_rss_mb") - first.median("processor_rss_mb")
    checks.append(
        (
            f"RSS at {last.clients:,} clients ≤ {first.clients:,} + 60 MB",
            f"{added:+.1f} MB",
            added <= 60,
        )
    )
    if last.reload_s:
        slowest = max(last.reload_s)
        checks.append(
            (
                f"keys-file reload at {last.clients:,} clients ≤ 2 s (slowest)",
                f"{slowest:.2f} s",
                slowest <= 2.0,
            )
        )
    return checks


def scale_markdown(report: ScaleReport) -> str:
    meta = report.meta
    out = [
        f"# Gateway scale benchmark {meta['started']}",
        "",
        f"{meta['machine']}; Envoy {meta['envoy']} with --concurrency 1; "
        f"wrk -t1, {meta['duration_s']:g}s per run, median of {meta['runs']} runs "
        f"(gateways take turns); reloads: median (slowest) of {meta['repeats']}; "
        f"the watcher polls every {meta['poll_s']:g} s; commit {meta['commit']}.",
    ]
    if report.clients:
        out += ["", "## Gateway clients (2 routes sharing one keys file)", ""]
        out += clients_table(report)
    if report.routes:
        out += ["", "## Routes", "", *routes_table(report)]
    checks = scale_targets(report)
    if checks:
        out += ["", "## Targets (issue 13)", ""]
        out += _table(
            ("target", "measured", "met"), [(w, m, "yes" if ok else "NO") for w, m, ok in checks]
        )
    return "\n".join(out) + "\n"


def markdown(report: Report) -> str:
    meta = report.meta
    out = [
        f"# Gateway benchmark {meta['started']}",
        "",
        f"{meta['machine']}; Envoy {meta['envoy']} with --concurrency 1; "
        f"wrk -t1, {meta['duration_s']:g}s per run, median of {meta['runs']} runs "
        f"(targets alternate); processor: `{meta['processor']}` "
        f"(server: {meta['server']}, workers: {meta['workers']}, "
        f"metering: {'on' if meta.get('metering') else 'off'}); commit {meta['commit']}.",
        "",
        "## Load (32 connections unless noted)",
        "",
        *load_table(report),
    ]
    if report.ttfb:
        out += ["", f"## SSE time to first byte (median of {meta['sse_samples']})", ""]
        out += sse_table(report)
    if report.streams:
        out += ["", "## Concurrent SSE streams through the gateway", "", *streams_table(report)]
    checks = targets(report)
    if checks:
        out += ["", "## Targets (issue 6)", ""]
        out += _table(
            ("target", "measured", "met"), [(w, m, "yes" if ok else "NO") for w, m, ok in checks]
        )
    return "\n".join(out) + "\n"


def _save(folder: Path, prefix: str, started: str, text: str, data: Any) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{prefix}-{started.replace(':', '').replace('-', '')}"
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    md.write_text(text)
    js.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return md, js


def write(report: Report, folder: Path) -> tuple[Path, Path]:
    """Save ``bench-<time>.md`` and ``.json`` under ``folder``; returns both paths."""
    data = {
        "meta": report.meta,
        "load": [
            {
                "scenario": row.scenario,
                "target": row.target,
                "median": {name: row.median(name) for name in Sample.__dataclass_fields__},
                "runs": [asdict(s) for s in row.samples],
            }
            for row in report.rows
        ],
        "sse_ttfb": report.ttfb,
        "sse_streams": report.streams,
        "targets": [{"target": w, "measured": m, "met": ok} for w, m, ok in targets(report)],
    }
    return _save(folder, "bench", report.meta["started"], markdown(report), data)


def write_scale(report: ScaleReport, folder: Path) -> tuple[Path, Path]:
    """Save ``bench-scale-<time>.md`` and ``.json`` under ``folder``; returns both paths."""
    data = {
        "meta": report.meta,
        "clients": [asdict(row) for row in report.clients],
        "routes": [asdict(row) for row in report.routes],
        "targets": [{"target": w, "measured": m, "met": ok} for w, m, ok in scale_targets(report)],
    }
    return _save(folder, "bench-scale", report.meta["started"], scale_markdown(report), data)
