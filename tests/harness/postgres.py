"""A throwaway PostgreSQL server from Debian's package: initdb + pg_ctl into a temp dir, free port.

PostgreSQL refuses to run as root, so as root the server runs as the package's
``postgres`` user. Trust authentication on 127.0.0.1 only; stopped in ``finally``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psycopg

from harness.ports import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@dataclass
class Postgres:
    data: Path
    port: int
    pg_ctl: str
    as_user: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"postgresql://gateway@127.0.0.1:{self.port}/spend"

    @property
    def admin_url(self) -> str:
        return f"postgresql://gateway@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, self.pg_ctl, *args], check=True, capture_output=True, timeout=60
        )

    def start(self) -> None:
        """Start and wait (with a deadline) until it takes connections."""
        log = self.data.parent / "postgres.log"
        self.run(
            "-D",
            str(self.data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {self.port} -k {self.data.parent}",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        self.run("-D", str(self.data), "-m", "fast", "-w", "stop")


@contextmanager
def postgres() -> Iterator[Postgres]:
    """A running server with database ``spend`` owned by user ``gateway``.

    Its folder is its own under /tmp (a root-only pytest tmp_path is not reachable for the
    ``postgres`` user) and is removed afterwards.
    """
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    assert initdb and pg_ctl, "Debian's postgresql package is needed (make spend-deps)"
    as_user: tuple[str, ...] = ("runuser", "-u", "postgres", "--") if os.geteuid() == 0 else ()
    folder = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    data = folder / "data"
    if as_user:
        shutil.chown(folder, "postgres")
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "gateway", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (data / "postgresql.auto.conf").write_text("listen_addresses = '127.0.0.1'\nfsync = off\n")
    server = Postgres(data, free_port(), pg_ctl, as_user)
    started = False
    try:
        server.start()
        started = True
        with psycopg.connect(server.admin_url, autocommit=True) as db:
            db.execute("CREATE DATABASE spend")
        yield server
    finally:
        if started:
            with suppress(subprocess.CalledProcessError):
                server.stop()
        shutil.rmtree(folder, ignore_errors=True)
