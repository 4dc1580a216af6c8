"""The processor's answers carry the secret: its port must not be reachable from off the machine.

Proof on a running ``python -m extproc serve``: every socket the process listens
on is bound to a loopback address (read from /proc, tied to the process by
its file descriptors), and connecting to the port through this machine's own
non-loopback addresses is refused. The probes are first shown to detect a
socket that is bound to all interfaces, so the checks can fail. Then the
config side: a non-loopback ``extproc.address`` is refused by validation and
by ``serve``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import base_env, free_port
from harness.adversary import accepts_connections, listening_sockets, local_addresses
from harness.gateway import ROOT, run_serve

from extproc.config import model
from extproc.config.load import load_config
from extproc.config.sections import ConfigError
from extproc.runtime import processes

READY_S = 30.0
ROUTE = {
    "name": "anthropic",
    "prefix": "/anthropic/",
    "upstream": "https://api.anthropic.com",
    "credential": {"header": "x-api-key", "secret": {"env": "SERVER_KEY"}},
}
# The processor backends the config knows (the default one first), so each is checked.
SERVERS = [None, *(kind.value for kind in getattr(model, "ServerKind", ()))]


def write_config(folder: Path, extproc: dict[str, Any], metrics: bool = True) -> Path:
    config: dict[str, Any] = {
        "listener": {"address": "127.0.0.1", "port": free_port()},
        "extproc": extproc,
        "routes": [ROUTE],
    }
    if metrics:
        config["metrics"] = {"port": free_port()}  # the default address
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """``serve(extproc_settings)`` → (process, extproc port) once SERVING; stopped afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(extproc: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int]:
        for _attempt in range(3):  # a free port can be taken before the process binds it
            port = free_port()
            config = write_config(tmp_path, {**extproc, "port": port})
            log = (tmp_path / "serve.log").open("wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "extproc", "serve", str(config)],
                stdout=log, stderr=subprocess.STDOUT, env=base_env({"SERVER_KEY": "k"}), cwd=ROOT,
            )  # fmt: skip
            started.append(process)
            try:
                processes.wait_serving(f"127.0.0.1:{port}", READY_S, process)
            except processes.NotReady:
                processes.stop(process)
                if "in use" not in (tmp_path / "serve.log").read_text():
                    raise AssertionError((tmp_path / "serve.log").read_text()) from None
                continue
            return process, port
        raise AssertionError("no free port after 3 attempts")

    yield start
    for process in started:
        processes.stop(process)


# -- the probes can fail --------------------------------------------------------------------


def test_the_socket_probe_sees_a_socket_bound_to_all_interfaces() -> None:
    with socket.socket() as wide, socket.socket() as narrow:
        wide.bind(("0.0.0.0", 0))
        narrow.bind(("127.0.0.1", 0))
        wide.listen()
        narrow.listen()
        found = {s.port: s for s in listening_sockets(os.getpid())}
        assert found[wide.getsockname()[1]].address == "0.0.0.0"
        assert not found[wide.getsockname()[1]].loopback
        assert found[narrow.getsockname()[1]].loopback
        for address in local_addresses():
            if ":" not in address:
                assert accepts_connections(address, wide.getsockname()[1])
                assert not accepts_connections(address, narrow.getsockname()[1])


# -- a running processor ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS, ids=[s or "default" for s in SERVERS])
def test_default_config_processor_listens_on_loopback_only_and_refuses_other_addresses(
    serve: Any, server: str | None
) -> None:
    process, port = serve({} if server is None else {"server": server})  # no address: default
    sockets = listening_sockets(process.pid)
    assert port in {s.port for s in sockets}, sockets
    assert [s for s in sockets if not s.loopback] == []
    assert {s.address for s in sockets if s.port == port} == {"127.0.0.1"}
    for address in local_addresses():
        assert not accepts_connections(address, port), f"ext_proc reachable at {address}:{port}"
    assert accepts_connections("127.0.0.1", port)


@pytest.mark.slow
def test_localhost_processor_listens_on_loopback_addresses_only(serve: Any) -> None:
    process, port = serve({"address": "localhost"})
    sockets = [s for s in listening_sockets(process.pid) if s.port == port]
    assert sockets and all(s.loopback for s in sockets), sockets
    for address in local_addresses():
        assert not accepts_connections(address, port)


# -- the config refuses a non-loopback processor address ---------------------------------------

NON_LOOPBACK = ["0.0.0.0", "::", "192.0.2.2", "10.0.0.5", "fd00::2", "example.com",
                "::ffff:0.0.0.0", "127.0.0.1.nip.io"]  # fmt: skip


@pytest.mark.parametrize("address", NON_LOOPBACK)
def test_non_loopback_extproc_address_is_a_config_error(tmp_path: Path, address: str) -> None:
    path = write_config(tmp_path, {"address": address, "port": 50051}, metrics=False)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.startswith("gateway.yaml:")
    assert "extproc.address: must be a loopback address" in problem


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_extproc_addresses_are_accepted(tmp_path: Path, address: str) -> None:
    path = write_config(tmp_path, {"address": address, "port": 50051}, metrics=False)
    assert load_config(path).extproc.address == address


def test_validate_and_serve_refuse_a_wildcard_extproc_address(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"address": "0.0.0.0", "port": free_port()}, metrics=False)
    validate = subprocess.run(
        [sys.executable, "-m", "extproc", "validate", str(path)],
        env=base_env({"SERVER_KEY": "k"}), cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert validate.returncode == 2
    assert "extproc.address: must be a loopback address" in validate.stderr
    served = run_serve(path, {"SERVER_KEY": "k"})
    assert served.returncode == 2
    assert "extproc.address: must be a loopback address" in served.stderr
