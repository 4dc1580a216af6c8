"""``extproc.workers: N``: N processor processes on one port, under one supervisor.

The kernel spreads Envoy's connections over the workers (SO_REUSEPORT), so the
processor uses more than one core. The supervisor is the only one watching
the files: on a change it loads the config itself, tells every worker to
reload (SIGHUP), waits until each reports the same policy version, and only
then hands Envoy the new routes, so no request can reach a worker that does
not know its route yet. It also serves the workers' summed metrics, restarts
a worker that dies (first dropping its gauges from the sum), and passes SIGTERM
on for a graceful stop.

A worker is started with SIGHUP blocked, so a reload signal sent before its
handler is installed waits instead of killing it; the worker unblocks it once
its handler is in place (``serve``).

A reload is one transaction over all of them: each worker stages the new
config (knowing both configs' route names, the old answers for names in both)
and reports ``<pid>.staged``; once all have, Envoy is handed the files; only
when Envoy took them does the supervisor write ``commit <version>`` to the
``decision`` file, and each worker commits. Any failure writes ``abort
<version>``: every worker, the supervisor and Envoy's files go back to the
last good config, and the supervisor retries.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from extproc.config.files import write_atomic
from extproc.config.model import GatewayConfig
from extproc.runtime.ports import PortTaken, check_free, gateway_ports
from extproc.runtime.processes import Backoff, start_child
from extproc.runtime.reload import PolicyHolder, watch
from extproc.runtime.status import ProcessorRecord, watcher_stuck
from extproc.runtime.xds import (
    ACCEPT_WAIT_SECONDS,
    CLUSTER_WAIT_SECONDS,
    DeliveryError,
    XdsWriter,
)
from extproc.server.metrics import MULTIPROCESS_ENV, Metrics, serve_workers, worker_died

log = logging.getLogger("extproc.workers")
RESTART_DELAY_S = 1.0
RELOAD_DEADLINE_S = 5.0
DECISION_FILE = "decision"  # "pending|commit|abort <version>", written by the supervisor
# How long a staged worker waits for the verdict: staging, clusters warming, Envoy's answer.
DECISION_WAIT_S = RELOAD_DEADLINE_S + CLUSTER_WAIT_SECONDS + ACCEPT_WAIT_SECONDS + 5.0
MAX_BACKOFF_S = 60.0


def report_version(control_dir: Path, version: str) -> None:
    """A worker's answer to SIGHUP: the policy version it now serves."""
    write_atomic(control_dir / f"{os.getpid()}.version", version, 0o644)


class StagedCommit:
    """A worker's delivery step: say the config is staged, then wait for the supervisor's verdict.

    Not armed for the worker's first load: the supervisor delivered that config already.
    """

    def __init__(self, control_dir: Path) -> None:
        self.control_dir = control_dir
        self.armed = False

    def __call__(self, _config: GatewayConfig, version: str) -> None:
        if not self.armed:
            return
        write_atomic(self.control_dir / f"{os.getpid()}.staged", version, 0o644)
        end = time.monotonic() + DECISION_WAIT_S
        while time.monotonic() < end:
            try:
                verdict = (self.control_dir / DECISION_FILE).read_text()
            except OSError:
                verdict = ""
            if verdict == f"commit {version}":
                return
            if verdict == f"abort {version}":
                raise DeliveryError(f"config {version} was not delivered to every worker and Envoy")
            time.sleep(0.01)
        raise DeliveryError(f"no verdict on config {version} within {DECISION_WAIT_S:.0f}s")


class Supervisor:
    def __init__(self, config_path: Path, xds_dir: Path | None, grace_s: float) -> None:
        self.config_path = config_path
        self.grace_s = grace_s
        self.writer = XdsWriter(xds_dir) if xds_dir else None
        self.holder = PolicyHolder(config_path, Metrics(), on_loaded=self._roll_out)
        self.run_dir = Path(tempfile.mkdtemp(prefix="extproc-workers-"))
        (self.run_dir / "metrics").mkdir()
        self.env = {**os.environ, MULTIPROCESS_ENV: str(self.run_dir / "metrics")}
        self.command = [
            sys.executable,
            "-m",
            "extproc",
            "serve",
            str(config_path),
            "--worker",
            str(self.run_dir),
        ]
        self.workers: list[subprocess.Popen[bytes]] = []
        self._backoff: dict[int, Backoff] = {}  # by worker slot
        self._recorded: tuple[bool, str, str] = (False, "", "")  # as last written to the record

    def _roll_out(self, config: GatewayConfig, version: str) -> None:
        """Every worker stages, Envoy takes the files, then every worker commits (or none)."""
        decision = self.run_dir / DECISION_FILE
        for staged in self.run_dir.glob("*.staged"):
            staged.unlink(missing_ok=True)  # an earlier attempt's reports do not count
        write_atomic(decision, f"pending {version}", 0o644)
        try:
            for worker in self.workers:
                worker.send_signal(signal.SIGHUP)
            if self.workers and not self._confirmed(version):
                raise DeliveryError(
                    f"not every worker staged config {version} within {RELOAD_DEADLINE_S:.0f}s"
                )
            if self.writer is not None:
                self.writer.write(config, version)
        except BaseException:
            write_atomic(decision, f"abort {version}", 0o644)
            raise
        write_atomic(decision, f"commit {version}", 0o644)

    def _load(self) -> bool:
        """A failed load is passed on too: each worker then reports it in health and metrics."""
        ok = self.holder.load()
        if not ok:
            for worker in self.workers:
                worker.send_signal(signal.SIGHUP)
        return ok

    def _confirmed(self, version: str) -> bool:
        deadline = time.monotonic() + RELOAD_DEADLINE_S
        while time.monotonic() < deadline:
            reports = [self.run_dir / f"{worker.pid}.staged" for worker in self.workers]
            if all(path.exists() and path.read_text() == version for path in reports):
                return True
            time.sleep(0.02)
        return False

    def run(self, config: GatewayConfig) -> int:
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.workers))
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:  # the workers share their port (SO_REUSEPORT): nobody else may have it
            check_free([p for p in gateway_ports(config) if p[0] in ("extproc", "metrics")])
        except PortTaken as exc:
            log.error("%s", exc)
            return 1
        if not self.holder.load():  # writes Envoy's files before any worker starts
            return 2
        self.workers = [self._start() for _ in range(config.extproc.workers)]
        if config.metrics is not None:
            serve_workers(config.metrics, self.run_dir / "metrics")
        watcher = threading.Thread(
            target=watch, args=(self.holder, stop, self._load), name="reload", daemon=True
        )
        watcher.start()
        record = ProcessorRecord(self.holder, config.extproc.target)
        try:
            while not stop.wait(RESTART_DELAY_S if record.serving else 0.05):
                self._restart_dead()
                self._report(record, watcher)
        finally:
            self._stop_all()
            record.serving = False
            record.write()
        return 0

    def _report(self, record: ProcessorRecord, watcher: threading.Thread) -> None:
        """The supervisor's status record: serving once every worker reported the version."""
        reports = [self.run_dir / f"{worker.pid}.version" for worker in self.workers]
        state = (
            all(path.exists() for path in reports),
            self.holder.policy.version,
            "STUCK" if watcher_stuck(self.holder, watcher.is_alive()) else "ok",
        )
        if state != self._recorded:
            record.serving, _version, record.watcher = self._recorded = state
            record.write()

    def _start(self) -> subprocess.Popen[bytes]:
        return start_child(self.command, env=self.env, block_sighup=True)

    def _restart_dead(self) -> None:
        """Replace dead workers, backing off (up to a minute) while they keep dying."""
        now = time.monotonic()
        for index, worker in enumerate(self.workers):
            backoff = self._backoff.setdefault(index, Backoff(MAX_BACKOFF_S))
            if worker.poll() is None or backoff.wait_s(now) > 0:
                continue
            log.error("worker %d exited with %s; restarting it", worker.pid, worker.returncode)
            worker_died(worker.pid, self.run_dir / "metrics")
            backoff.restarted(now)
            self.workers[index] = self._start()

    def _stop_all(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(self.grace_s + 2)
            except subprocess.TimeoutExpired:
                worker.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)
