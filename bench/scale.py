"""How the gateway's costs grow with gateway clients and with routes (``run.py --scale``).

Clients: one gateway per client count (10 … 100,000 keys in one keys file shared
by the two routes), all running side by side and measured in turns like the
load table (same wrk runs, same /proc accounting), with requests that present
a handful of distinct valid gateway keys in ``x-api-key``. Then, one gateway
at a time, the reload after a keys-file change: one key is appended and the
clock stops when a request with that key succeeds through Envoy.

Routes: for 10 … 1,000 routes, ``python -m extproc render`` (bootstrap, and
the xDS files), the same work in-process, and the time from adding one route
to the YAML until Envoy serves it (processor with ``--xds-dir``).

Reloads are timed as the processor's file watcher finds the change, which is
what an operator sees: up to one poll interval of waiting is included. For
routes, the share after the processor replaced rds.yaml is Envoy's. (SIGHUP is
not used: the watcher would load the same change a second time meanwhile.)
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import shutil
import sys
import time
import timeit
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import procstat
import topology
import wrkload
import yaml
from measure import API_PATH, measure
from report import ClientScale, RouteScale
from topology import Gateway, Stack, Upstreams

from extproc.config.load import load_config
from extproc.policy.access import GatewayKeys, KeyLine, key_digest, new_key, read_keys
from extproc.policy.compiled import compile_policy
from extproc.runtime import processes
from extproc.runtime.reload import POLL_SECONDS, SETTLE_SECONDS

__all__ = ["POLL_SECONDS", "run_clients", "run_routes"]
from extproc.render.bootstrap import RESOURCE_FILES
from extproc.runtime.xds import XdsWriter

CLIENT_COUNTS = (10, 1_000, 10_000, 100_000)
ROUTE_COUNTS = (10, 100, 1_000)
PRESENTED_KEYS = 8  # distinct valid keys the load sends in turn, spread through the file
HEADERS = {"anthropic-version": "2023-06-01", "user-agent": "bench/1"}
ENVIRON = {topology.SERVER_KEY_ENV: topology.SERVER_KEY}
_RELOAD_DEADLINE_S = 30.0
_POLL_S = 0.005
_Progress = Callable[[str], None]


def _say(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def write_keys(path: Path, count: int) -> list[str]:
    """A keys file of ``count`` clients; returns the keys of a few, spread through the file."""
    step = max(count // PRESENTED_KEYS, 1)
    presented: list[str] = []
    lines = []
    for number in range(count):
        key = new_key()
        if number % step == step // 2 and len(presented) < PRESENTED_KEYS:
            presented.append(key)
        lines.append(KeyLine(f"client-{number:06d}", key_digest(key)).text())
    path.write_text("\n".join(lines) + "\n")
    return presented


def _status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            reply.read()
            status: int = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status


def _inode(path: Path | None) -> int | None:
    try:
        return path.stat().st_ino if path else None
    except OSError:
        return None


def _wait_ok(
    url: str, headers: dict[str, str], started: float, marker: Path | None, old: int | None
) -> tuple[float, float]:
    """Seconds from ``started`` until ``url`` answers 200, and from ``marker``'s replacement.

    ``marker`` (rds.yaml) is replaced by the processor's last write before Envoy
    can serve a new route; 0 for the second figure when there is none to watch.
    """
    replaced = None
    while True:
        if marker is not None and replaced is None and _inode(marker) != old:
            replaced = time.perf_counter()
        if _status(url, headers) == 200:
            now = time.perf_counter()
            return now - started, (now - replaced if replaced else 0.0)
        if time.perf_counter() - started > _RELOAD_DEADLINE_S:
            raise TimeoutError(f"{url} did not answer 200 within {_RELOAD_DEADLINE_S}s")
        time.sleep(_POLL_S)


def _loads(gateway: Gateway) -> int:
    """Successful config loads so far, from the processor's /metrics."""
    port = yaml.safe_load(gateway.config.read_text())["metrics"]["port"]
    url = f"http://{topology.LOOPBACK}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith('gateway_config_reloads_total{result="success"}'):
            return int(float(line.split()[-1]))
    return 0


def _wait_loads(gateway: Gateway, count: int) -> None:
    """Wait until the processor has finished ``count`` loads (or a generous deadline)."""
    end = time.monotonic() + _RELOAD_DEADLINE_S
    while _loads(gateway) < count and time.monotonic() < end:
        time.sleep(0.05)


def time_reloads(
    gateway: Gateway, change: Callable[[int], tuple[str, dict[str, str]]], repeats: int
) -> tuple[list[float], list[float]]:
    """Reload times as the watcher finds the changes ``change(n)`` makes.

    ``change(n)`` edits a watched file and returns the request that succeeds
    once the change is served. Returns (change → served, rds.yaml replaced →
    served); the second is empty without xDS files.
    """
    totals, envoy = [], []
    marker = gateway.xds_dir / RESOURCE_FILES["rds"] if gateway.xds_dir else None
    for number in range(repeats):
        # A change lands anywhere in the poll cycle (not a secret: S311 does not apply).
        time.sleep(random.uniform(0, POLL_SECONDS))  # noqa: S311
        before, old = _loads(gateway), _inode(marker)
        started = time.perf_counter()
        url, headers = change(number)
        total, after_rds = _wait_ok(url, headers, started, marker, old)
        totals.append(total)
        if marker is not None:
            envoy.append(after_rds)
        _wait_loads(gateway, before + 1)
        time.sleep(SETTLE_SECONDS)
    return totals, envoy


def _identify_us(table_file: Path, presented: list[str]) -> float:
    """``GatewayKeys.identify`` per call, in-process, cycling through the presented keys."""
    keys = GatewayKeys("x-api-key", read_keys(table_file), False)
    cycle = itertools.cycle([key.encode() for key in presented])
    assert all(keys.identify(key.encode()) for key in presented)
    number = 50_000
    spent = min(timeit.repeat(lambda: keys.identify(next(cycle)), number=number, repeat=3))
    return spent / number * 1e6


def _config_file(folder: Path, stem: str, **settings: Any) -> Path:
    """A gateway YAML for in-process timing (the ports are never opened)."""
    path = folder / f"{stem}.yaml"
    document = topology.gateway_config(
        listener=1081, admin=1082, extproc=1083, metrics=1084, upstream=1085, sse=1086,
        workers=1, **settings,
    )  # fmt: skip
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _compile_times(folder: Path, keys_file: Path, count: int) -> tuple[float, float]:
    """In-process: load + compile the policy, then recompile after one key is appended."""
    copy = folder / f"inprocess-keys-{count}.txt"
    shutil.copyfile(keys_file, copy)
    config = _config_file(folder, f"inprocess-{count}", keys_file=copy)
    started = time.perf_counter()
    policy = compile_policy(load_config(config), ENVIRON)
    fresh = time.perf_counter() - started
    with copy.open("a") as out:
        out.write(KeyLine("inprocess-new", key_digest(new_key())).text() + "\n")
    started = time.perf_counter()
    compile_policy(load_config(config), ENVIRON, policy)
    return fresh, time.perf_counter() - started


def _rotate(items: list[Any], run: int) -> list[Any]:
    """Each run starts with the next item, so drift does not always hit the same one."""
    shift = run % len(items)
    return items[shift:] + items[:shift]


def run_clients(
    stack: Stack,
    upstreams: Upstreams,
    wrk: str,
    *,
    runs: int,
    duration: float,
    repeats: int,
    counts: tuple[int, ...] = CLIENT_COUNTS,
) -> list[ClientScale]:
    folder = stack.folder
    rows: dict[int, ClientScale] = {}
    gateways: dict[int, Gateway] = {}
    scripts: dict[int, Path] = {}
    keys_files: dict[int, Path] = {}
    for count in counts:
        keys_files[count] = folder / f"keys-{count}.txt"
        presented = write_keys(keys_files[count], count)
        fresh, keys_only = _compile_times(folder, keys_files[count], count)
        rows[count] = ClientScale(
            count, _identify_us(keys_files[count], presented), fresh, keys_only
        )
        gateways[count] = topology.start_gateway(
            stack, upstreams, name=f"clients{count}", keys_file=keys_files[count]
        )
        scripts[count] = folder / f"clients{count}.lua"
        kinds = [{**HEADERS, "x-api-key": key} for key in presented]
        scripts[count].write_text(wrkload.lua_script(API_PATH, kinds))
        _say(f"{count:,} clients: identify {rows[count].identify_us:.2f} µs, load + compile "
             f"{fresh * 1e3:.0f} ms, keys-only recompile {keys_only * 1e3:.0f} ms")  # fmt: skip
    for count, spent in _idle_cpu_ms_per_s(gateways).items():
        rows[count].idle_cpu_ms_s = spent
    for count, gateway in gateways.items():  # warm-up
        wrkload.run(wrk, scripts[count], gateway.envoy.url(API_PATH), 32, min(2.0, duration))
    for run in range(runs):
        for count in _rotate(list(counts), run):
            gateway = gateways[count]
            topo = gateway.topology(upstreams)
            sample = measure(topo, wrk, gateway.envoy, scripts[count], duration)
            rows[count].samples.append(sample)
            _say(f"{count:,} clients run {run + 1}/{runs}: processor {sample.processor_us:.1f} µs, "
                 f"p50@1 {sample.p50_c1_ms:.3f} ms, RSS {sample.processor_rss_mb:.1f} MB, "
                 f"errors {sample.errors}, other CPU {sample.other_cpu_pct:.0f} %")  # fmt: skip
    for count, gateway in gateways.items():
        append_key = functools.partial(_append_key, keys_files[count], gateway.envoy.url(API_PATH))
        rows[count].reload_s, _ = time_reloads(gateway, append_key, repeats)
        _say(f"{count:,} clients: reload {_seconds(rows[count].reload_s)}")
    return list(rows.values())


def _idle_cpu_ms_per_s(gateways: dict[int, Gateway], seconds: float = 5.0) -> dict[int, float]:
    """Each idle processor's CPU, in ms per second (the watcher hashes its files every poll)."""
    before = {count: procstat.usage(g.processor.pid).cpu_s for count, g in gateways.items()}
    time.sleep(seconds)
    after = {count: procstat.usage(g.processor.pid).cpu_s for count, g in gateways.items()}
    return {count: (after[count] - before[count]) / seconds * 1000 for count in gateways}


def _append_key(path: Path, url: str, number: int) -> tuple[str, dict[str, str]]:
    """Append one client to the keys file; returns where to send its key, and how."""
    key = new_key()
    with path.open("a") as out:
        out.write(KeyLine(f"added-{number:03d}", key_digest(key)).text() + "\n")
    return url, {**HEADERS, "x-api-key": key}


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"


def _envoy_routes(rds: Path) -> int:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    document = yaml.load(rds.read_text(), Loader=loader)  # noqa: S506 (a safe loader)
    hosts = (vh for resource in document["resources"] for vh in resource["virtual_hosts"])
    return sum(len(vh["routes"]) for vh in hosts)


def _render_times(folder: Path, count: int) -> RouteScale:
    """``python -m extproc render`` (bootstrap, then with --xds-dir) and the same in-process."""
    config = _config_file(folder, f"routes{count}-render", routes=count)
    bootstrap = folder / f"routes{count}-render-envoy.yaml"
    xds_dir = folder / f"routes{count}-render-xds"
    render_s = _timed(lambda: topology.render(config, bootstrap))
    render_xds_s = _timed(lambda: topology.render(config, bootstrap, xds_dir))
    loaded = load_config(config)
    load_s = _timed(lambda: compile_policy(load_config(config), ENVIRON))
    again = folder / f"routes{count}-inprocess-xds"
    xds_write_s = _timed(lambda: XdsWriter(again).write(loaded))
    rds = xds_dir / RESOURCE_FILES["rds"]
    return RouteScale(
        routes=count,
        envoy_routes=_envoy_routes(rds),
        xds_kb=sum(p.stat().st_size for p in xds_dir.glob("*.yaml")) / 1024,
        render_s=render_s,
        render_xds_s=render_xds_s,
        load_s=load_s,
        xds_write_s=xds_write_s,
    )


def _add_route(gateway: Gateway, numbers: Iterator[int], _: int) -> tuple[str, dict[str, str]]:
    """Add one route (like the first) to the gateway's YAML, atomically; returns its URL."""
    document = yaml.safe_load(gateway.config.read_text())
    first = document["routes"][0]
    route = topology.numbered_route(next(numbers), first["upstream"], first["credential"])
    document["routes"].append(route)
    tmp = gateway.config.with_name(f".{gateway.config.name}.tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    os.replace(tmp, gateway.config)
    return gateway.envoy.url(route["prefix"] + "v1/messages"), HEADERS


def run_routes(
    stack: Stack,
    upstreams: Upstreams,
    *,
    repeats: int,
    counts: tuple[int, ...] = ROUTE_COUNTS,
) -> list[RouteScale]:
    rows = []
    for count in counts:
        row = _render_times(stack.folder, count)
        gateway = topology.start_gateway(
            stack, upstreams, name=f"routes{count}", routes=count, xds=True
        )
        add_route = functools.partial(_add_route, gateway, itertools.count(count))
        row.reload_s, row.reload_envoy_s = time_reloads(gateway, add_route, repeats)
        rows.append(row)
        _say(f"{count:,} routes: render {row.render_s:.2f} s, --xds-dir {row.render_xds_s:.2f} s, "
             f"reload {_seconds(row.reload_s)}, of which Envoy "
             f"{_seconds(row.reload_envoy_s)}")  # fmt: skip
        for service in (gateway.envoy, gateway.processor):  # free the cores for the next count
            processes.stop(service.process)
    return rows
