"""Benchmark the gateway against a bare Envoy proxy (``make bench`` / ``python bench/run.py``).

Starts on free loopback ports a direct-response Envoy upstream, a bare Envoy
proxy in front of it (the baseline) and the gateway (processor + Envoy with
the rendered bootstrap), then drives the same wrk load at the baseline and the
gateway in turns for three kinds of request: (a) with the client's own OAuth
credential, (b) needing injection, (c) a 50/50 mix. Then SSE: time to first
byte through the gateway vs direct, and many concurrent streams held open.
Prints one report and saves it as Markdown + JSON under bench/results/.
bench/README.md says how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Run as a script: the extproc package beside bench/ must be importable even when the
# project is not pip-installed (the processes this starts get the same path).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import procstat  # noqa: E402
import report  # noqa: E402
import scale  # noqa: E402
import sse_probe  # noqa: E402
import topology  # noqa: E402
import wrkload  # noqa: E402
from measure import (  # noqa: E402
    API_PATH,
    EXTPROC_ACTIVE,
    EXTPROC_STREAMS,
    METERING_STREAMS,
    measure,
    settle,
)
from report import Report, Row, Sample  # noqa: E402
from topology import Service, Topology  # noqa: E402

COMMON_HEADERS = {"anthropic-version": "2023-06-01", "user-agent": "bench/1"}
OAUTH = {"authorization": "Bearer sk-ant-oat01-bench-client-token-000000000000000000000000"}
DOWNSTREAM_ACTIVE = "gateway downstream requests active (min)"
UPSTREAM_OPEN = "streams open at the upstream (min)"
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Scenario:
    name: str
    kinds: tuple[dict[str, str], ...]  # header sets sent in turn


SCENARIOS = {
    "client": Scenario(report.CLIENT, (OAUTH,)),
    "inject": Scenario(report.INJECT, ({},)),
    "mix": Scenario(report.MIX, (OAUTH, {})),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per target (median; default 3)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run of 2 s, fewer SSE")
    parser.add_argument(
        "--scenarios", default="client,inject,mix", help="subset of client,inject,mix"
    )
    parser.add_argument("--sse-samples", type=int, default=200, help="TTFB samples per path")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent SSE streams held")
    parser.add_argument("--no-sse", action="store_true", help="skip the SSE measurements")
    parser.add_argument("--workers", type=int, default=1, help="the config's extproc.workers")
    parser.add_argument("--server", help="the config's extproc.server (default: the config's)")
    parser.add_argument(
        "--metering",
        action="store_true",
        help="`metering: true` in the gateway's config (Envoy's Lua meter, gRPC access log)",
    )
    parser.add_argument(
        "--processor-command",
        help="run this instead of `python -m extproc serve` ({config} = the YAML path)",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="instead: the scale tables (10 … 100,000 gateway clients, 10 … 1,000 routes)",
    )
    parser.add_argument("--reloads", type=int, default=5, help="--scale: reloads timed per count")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.sse_samples, args.streams = 1, 2.0, 20, 200
        args.reloads = 2
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def run_load(
    topo: Topology,
    wrk: str,
    scenarios: list[Scenario],
    *,
    runs: int,
    duration: float,
    folder: Path,
) -> list[Row]:
    """Baseline and gateway take turns (the order flips each run) so drift hits both."""
    rows: list[Row] = []
    for number, scenario in enumerate(scenarios):
        script = folder / f"scenario{number}.lua"
        kinds = [{**COMMON_HEADERS, **kind} for kind in scenario.kinds]
        script.write_text(wrkload.lua_script(API_PATH, kinds))
        pairs = [
            (Row(scenario.name, report.BASELINE), topo.baseline),
            (Row(scenario.name, report.GATEWAY), topo.gateway),
        ]
        for _, service in pairs:  # warm-up: connections, pools, caches
            wrkload.run(wrk, script, service.url(API_PATH), 32, min(2.0, duration))
        for run in range(runs):
            for row, service in pairs if run % 2 == 0 else pairs[::-1]:
                sample = measure(topo, wrk, service, script, duration)
                row.samples.append(sample)
                _progress(f"{row.scenario} / {row.target} run {run + 1}/{runs}", sample)
        rows += [row for row, _ in pairs]
    return rows


def _progress(label: str, s: Sample) -> None:
    print(
        f"  {label}: {s.rps:,.0f} req/s, p50 {s.p50_ms:.3f} ms, p99 {s.p99_ms:.3f} ms, "
        f"p50@1 {s.p50_c1_ms:.3f} ms, envoy {s.envoy_us:.1f} µs, processor "
        f"{s.processor_us:.1f} µs, errors {s.errors}",
        file=sys.stderr,
        flush=True,
    )


def _since(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def _upstream_stats(sse: Service) -> dict[str, int]:
    """``open_streams`` now and ``events`` sent so far, from the SSE upstream."""
    with urllib.request.urlopen(sse.url("/stats"), timeout=5) as reply:
        value: dict[str, int] = json.loads(reply.read())
        return value


async def run_sse(
    topo: Topology, samples: int, streams: int
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """TTFB per path (the targets take turns), then ``streams`` streams held at once."""
    ttfb_path = topology.SSE_PREFIX + "v1/messages?events=3&pause_ms=5"
    paths = {
        report.TTFB_DIRECT: (topo.sse.port, {}),
        "bare Envoy": (topo.baseline.port, {}),
        report.TTFB_INJECTED: (topo.gateway.port, {}),
        "gateway, client credential": (topo.gateway.port, OAUTH),
    }
    await asyncio.to_thread(settle, topo)  # no observing stream left from the load runs
    await sse_probe.ttfb(paths, ttfb_path, 3)  # warm-up
    ttfb = await sse_probe.ttfb(paths, ttfb_path, samples)
    await asyncio.to_thread(settle, topo)  # nor from the samples
    hold_path = topology.SSE_PREFIX + "v1/messages?events=600&pause_ms=1000"
    rss_before = procstat.usage(topo.processor.pid).rss_bytes / 2**20
    before = topo.gateway.stats()

    async def snapshot() -> dict[str, float]:
        seen: dict[str, list[float]] = {}
        first = await asyncio.to_thread(_upstream_stats, topo.sse)
        cpu = procstat.usage(topo.processor.pid).cpu_s, procstat.usage(topo.gateway.pid).cpu_s
        for _ in range(5):
            stats = await asyncio.to_thread(topo.gateway.stats)
            upstream = await asyncio.to_thread(_upstream_stats, topo.sse)
            usage = procstat.usage(topo.processor.pid)
            envoy = procstat.usage(topo.gateway.pid)
            values = {
                report.STREAMS_HELD: stats.get(EXTPROC_ACTIVE, 0),
                DOWNSTREAM_ACTIVE: stats.get("http.gateway.downstream_rq_active", 0),
                UPSTREAM_OPEN: upstream["open_streams"],
                report.STREAMS_RSS: usage.rss_bytes / 2**20,
                "processor threads (streams held)": usage.threads,
                "gateway Envoy RSS MB (streams held)": envoy.rss_bytes / 2**20,
                "ext_proc streams started for them": _since(before, stats, EXTPROC_STREAMS),
                "usage records for them (Envoy's access log)": _since(
                    before, stats, METERING_STREAMS
                ),
            }
            for key, value in values.items():
                seen.setdefault(key, []).append(float(value))
            await asyncio.sleep(0.6)
        # CPU per event while the streams are held (1 event per stream per second).
        events = max(upstream["events"] - first["events"], 1)
        per_event = {
            report.EVENT_PROCESSOR_US: (usage.cpu_s - cpu[0]) / events * 1e6,
            report.EVENT_ENVOY_US: (envoy.cpu_s - cpu[1]) / events * 1e6,
        }
        # Open counts: the lowest seen (all held throughout); costs: the highest seen.
        low = {UPSTREAM_OPEN, DOWNSTREAM_ACTIVE}
        return {key: (min(v) if key in low else max(v)) for key, v in seen.items()} | per_event

    held = await sse_probe.hold_streams(topo.gateway.port, hold_path, streams, snapshot)
    return ttfb, {
        "streams requested": float(streams),
        "processor RSS MB (before)": round(rss_before, 1),
        **{key: round(value, 1) for key, value in held.items()},
    }


def _meta(args: argparse.Namespace, envoy: str, wrk: str) -> dict[str, object]:
    def output(command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        return (done.stdout + done.stderr).strip()

    models = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    cpu = models[0] if models else platform.machine()
    commit = output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = output(["git", "-C", str(ROOT), "status", "--porcelain", "extproc"])
    version = output([envoy, "--version"]).split("version:")[-1].strip().split("/")[1]
    return {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}",
        "envoy": version,
        "wrk": output([wrk, "--version"]).splitlines()[0].split(" [")[0],
        "commit": commit + ("+changes" if dirty else ""),
        "runs": args.runs,
        "duration_s": args.duration,
        "sse_samples": args.sse_samples,
        "streams": args.streams,
        "workers": args.workers,
        "server": args.server or "(config default)",
        "metering": args.metering,
        "processor": args.processor_command or "python -m extproc serve CONFIG",
    }


def _raise_file_limit() -> None:
    """Thousands of sockets (held SSE streams) need more than the usual 1024 descriptors."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main_scale(args: argparse.Namespace, wrk: str) -> int:
    """``--scale``: one Markdown + JSON report with the clients and routes tables."""
    folder = Path(tempfile.mkdtemp(prefix="gateway-bench-scale-"))
    started = time.monotonic()
    with topology.Stack(folder) as stack:
        meta = {
            **_meta(args, stack.envoy, wrk),
            "repeats": args.reloads,
            "poll_s": scale.POLL_SECONDS,
        }
        upstreams = topology.start_upstreams(stack)
        print(f"upstreams up (logs in {folder}); measuring…", file=sys.stderr, flush=True)
        clients = scale.run_clients(
            stack, upstreams, wrk, runs=args.runs, duration=args.duration, repeats=args.reloads
        )
        routes = scale.run_routes(stack, upstreams, repeats=args.reloads)
    shutil.rmtree(folder, ignore_errors=True)
    result = report.ScaleReport(meta, clients, routes)
    md, js = report.write_scale(result, args.output)
    print(report.scale_markdown(result))
    print(f"written: {md} and {js} ({time.monotonic() - started:.0f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = wrkload.find_wrk()
    _raise_file_limit()
    if args.scale:
        return main_scale(args, wrk)
    scenarios = [SCENARIOS[key] for key in args.scenarios.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    started = time.monotonic()
    with topology.Stack(folder) as stack:
        meta = _meta(args, stack.envoy, wrk)
        topo = topology.start(
            stack, args.workers, args.processor_command, args.server, args.metering
        )
        print(f"processes up (logs in {folder}); measuring…", file=sys.stderr, flush=True)
        result = Report(
            meta,
            run_load(
                topo,
                wrk,
                scenarios,
                runs=args.runs,
                duration=args.duration,
                folder=folder,
            ),
        )
        if not args.no_sse:
            result.ttfb, result.streams = asyncio.run(run_sse(topo, args.sse_samples, args.streams))
    shutil.rmtree(folder, ignore_errors=True)
    text = report.markdown(result)
    md, js = report.write(result, args.output)
    print(text)
    print(f"written: {md} and {js} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
