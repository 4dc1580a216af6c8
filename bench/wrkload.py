"""Drive load with wrk and read back throughput, latency percentiles and errors.

A generated Lua script sends the scenario's requests in turn (one kind, or two
alternating for the 50/50 mix) and prints its summary as one JSON line, so
nothing depends on wrk's human-readable output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_MARK = "BENCH_JSON "

_LUA = """
local kinds = {KINDS}
local requests = {}
local counter = 0

function init(args)
  for i, headers in ipairs(kinds) do
    requests[i] = wrk.format("GET", "PATH", headers)
  end
end

function request()
  counter = counter + 1
  return requests[(counter % #requests) + 1]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'MARK{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx/3xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lua_script(path: str, kinds: list[dict[str, str]]) -> str:
    """A wrk script sending ``path`` with each header set in ``kinds`` in turn."""
    tables = ", ".join(
        "{" + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in kind.items()) + "}"
        for kind in kinds
    )
    return (
        _LUA.replace("{KINDS}", "{" + tables + "}")
        .replace('"PATH"', _lua_string(path))
        .replace("MARK", _MARK)
    )


def find_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk not found: apt-get install -y wrk (Debian's package)")
    return found


def run(wrk: str, script: Path, url: str, connections: int, duration_s: float) -> WrkResult:
    """One wrk run with one thread (the machine's other core belongs to the servers)."""
    command = [
        wrk, "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "5s",
        "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            return WrkResult(
                requests=data["requests"],
                duration_s=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                errors=sum(data["errors"].values()),
            )
    raise RuntimeError(f"wrk gave no summary (exit {done.returncode}):\n{done.stdout}{done.stderr}")
