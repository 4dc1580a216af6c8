"""How reliably ``up`` starts: ROUNDS rounds of PARALLEL ``up`` processes started together.

Each ``up`` must print "gateway ready", inject the key into one request to a
local upstream, and exit 0 on SIGTERM (``timeout_ms`` 5000: this counts starts,
not a loaded machine's slow answers). Any other outcome is counted with the
tail of its output (issue 16 item 15: Envoy once aborted with "epoll_wait
error: Bad file descriptor" in about ten starts of four gateways together).

    .venv/bin/python bench/up_starts.py [--rounds 50] [--parallel 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from harness.ports import free_port  # noqa: E402 (the tests' free-port picker)

KEY = "sk-bench-up-starts"
READY = "gateway ready"


class Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.headers.get("x-api-key") == KEY
        self.send_response(200 if ok else 401)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def config_text(upstream_port: int) -> str:
    return (
        f"listener: {{address: 127.0.0.1, port: {free_port()}}}\n"
        f"admin: {{address: 127.0.0.1, port: {free_port()}}}\n"
        "extproc: {timeout_ms: 5000}\n"  # a loaded machine must not turn a start into a 504
        "routes:\n"
        f"  - name: a\n    prefix: /a\n    upstream: 'http://127.0.0.1:{upstream_port}'\n"
        "    credential: {header: x-api-key, secret: {env: BENCH_KEY}}\n"
    )


def one_up(folder: Path, upstream_port: int) -> str | None:
    """Start, use and stop one ``up``; None if all went well, else what went wrong."""
    folder.mkdir()
    config = folder / "gateway.yaml"
    config.write_text(config_text(upstream_port))
    port = int(config.read_text().split("port: ")[1].split("}")[0])
    log = folder / "up.log"
    env = {**os.environ, "BENCH_KEY": KEY}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "extproc", "up", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
        )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while READY not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > end:
                return f"not ready (code {process.poll()})"
            time.sleep(0.05)
        status = httpx.get(f"http://127.0.0.1:{port}/a/x", timeout=10).status_code
        if status != 200:
            return f"request answered {status}"
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        return None if code == 0 else f"exit code {code} after SIGTERM"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def checked_up(folder: Path, upstream_port: int, failures: list[str]) -> None:
    """One ``up``; a failure is added to ``failures`` with the tail of its output."""
    problem = one_up(folder, upstream_port)
    if problem is not None:
        tail = (folder / "up.log").read_text(errors="replace")[-2000:]
        failures.append(f"{folder.name}: {problem}\n{tail}")


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__)
    options.add_argument("--rounds", type=int, default=50)
    options.add_argument("--parallel", type=int, default=4)
    args = options.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    failures: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="up-starts-") as scratch:
        for round_ in range(args.rounds):
            threads = [
                threading.Thread(
                    target=checked_up,
                    args=(Path(scratch) / f"r{round_}-{i}", server.server_address[1], failures),
                )
                for i in range(args.parallel)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    total = args.rounds * args.parallel
    seconds = time.monotonic() - started
    print(f"{total - len(failures)} of {total} starts of up served and stopped cleanly "
          f"({args.rounds} rounds of {args.parallel} together, {seconds:.0f} s)")  # fmt: skip
    for failure in failures:
        print(failure)
    server.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
