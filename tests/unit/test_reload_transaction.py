"""A reload is a transaction: processor and Envoy take a new config together or not at all.

The delivery step (``on_loaded``: Envoy's files, workers) is faked here so each
failure can be made at will; ``XdsWriter`` is driven against a fake Envoy admin
that shows the versions it "accepted".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig
from extproc.runtime import reload
from extproc.runtime.reload import PolicyHolder, watch
from extproc.runtime.xds import VERSION_STATS, DeliveryError, XdsWriter
from extproc.server.metrics import Metrics

CONFIG = """\
listener: {{address: 127.0.0.1, port: 4000}}
admin: {{address: 127.0.0.1, port: {admin}}}
routes:
  - {{name: {name}, prefix: /p, upstream: '{upstream}'}}
"""


def write(
    path: Path, name: str = "old", upstream: str = "http://127.0.0.1:1", admin: int = 1
) -> None:
    path.write_text(CONFIG.format(name=name, upstream=upstream, admin=admin))


class Delivery:
    """A fake ``on_loaded``: fails while ``failing``; records what it was handed."""

    def __init__(self) -> None:
        self.failing = False
        self.versions: list[str] = []
        self.seen_routes: list[set[str]] = []
        self.holder: PolicyHolder | None = None

    def __call__(self, config: GatewayConfig, version: str) -> None:
        assert self.holder is not None
        self.seen_routes.append(set(self.holder.policy.routes) if self.versions else set())
        self.versions.append(version)
        if self.failing:
            raise DeliveryError("Envoy did not accept it")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[PolicyHolder, Path, Delivery]:
    path = tmp_path / "gateway.yaml"
    write(path)
    delivery = Delivery()
    holder = PolicyHolder(path, Metrics(), environ={}, on_loaded=delivery)
    delivery.holder = holder
    assert holder.load()
    return holder, path, delivery


def names(holder: PolicyHolder) -> set[str]:
    return {name.rsplit("-", 1)[0] for name in holder.policy.routes}


def test_a_failed_delivery_keeps_the_processor_on_the_last_good_config(
    setup: tuple[PolicyHolder, Path, Delivery],
) -> None:
    holder, path, delivery = setup
    before = holder.policy.version
    write(path, name="new")
    delivery.failing = True
    assert not holder.load()
    assert holder.policy.version == before  # not the new config's policy
    assert names(holder) == {"old"}
    assert holder.config is not None and holder.config.routes[0].name == "old"
    assert holder.retry.due is not None, "the change must be tried again"
    assert holder.metrics.config_last_reload_ok._value.get() == 0


def test_during_delivery_the_processor_knows_both_configs_route_names(
    setup: tuple[PolicyHolder, Path, Delivery],
) -> None:
    holder, path, delivery = setup
    write(path, name="new")
    assert holder.load()
    assert {n.rsplit("-", 1)[0] for n in delivery.seen_routes[-1]} == {"old", "new"}
    assert "new" in names(holder)  # committed; the old names stay one reload longer


def test_the_watcher_retries_a_failed_delivery_without_another_change_and_logs_it_once(
    setup: tuple[PolicyHolder, Path, Delivery],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(reload, "RETRY_FIRST_S", 0.1)
    holder, path, delivery = setup
    holder.retry.clear()
    stop = threading.Event()
    delivery.failing = True
    thread = threading.Thread(target=watch, args=(holder, stop, None, 0.02))
    beats = {holder.watched_at}
    thread.start()
    try:
        # Two heartbeats after the start: the first round (the first look) has ended.
        wait_until(lambda: beats.add(holder.watched_at) or len(beats) >= 3)
        write(path, name="new")
        wait_until(lambda: len(delivery.versions) >= 3)  # first try, then retries
        assert "new" not in names(holder)
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1, errors
        delivery.failing = False
        wait_until(lambda: "new" in names(holder))
        assert holder.retry.due is None
    finally:
        stop.set()
        thread.join(5)


def test_the_watcher_survives_any_error_counts_it_and_keeps_reloading(
    setup: tuple[PolicyHolder, Path, Delivery],
) -> None:
    holder, path, _delivery = setup
    calls: list[int] = []

    def load() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RecursionError("a bug below the loader")
        return holder.load()

    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(holder, stop, load, 0.02))
    thread.start()
    try:
        time.sleep(0.1)
        write(path, name="second")
        wait_until(lambda: calls != [])
        write(path, name="third")
        wait_until(lambda: "third" in names(holder))
        assert thread.is_alive()
        assert holder.metrics.watch_errors._value.get() == 1
    finally:
        stop.set()
        thread.join(5)


def wait_until(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


class FakeAdmin:
    """An Envoy admin whose /stats shows ``versions``, /clusters the clusters of ``cds.json``."""

    def __init__(self, xds_dir: Path) -> None:
        self.versions = dict.fromkeys(VERSION_STATS, "")
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/clusters"):
                    cds = json.loads((xds_dir / "cds.json").read_text())["resources"]
                    body = "".join(f"{c['name']}::added_via_api::true\n" for c in cds)
                else:
                    body = "".join(
                        f'{stat}: "{admin.versions[kind]}"\n'
                        for kind, stat in VERSION_STATS.items()
                    )
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[FakeAdmin]:
    fake = FakeAdmin(tmp_path / "xds")
    yield fake
    fake.server.shutdown()


def test_files_envoy_does_not_take_are_replaced_by_the_last_accepted_ones(
    tmp_path: Path, admin: FakeAdmin
) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, admin=admin.port)
    writer = XdsWriter(tmp_path / "xds", accept_wait_s=0.3)
    admin.versions = dict.fromkeys(VERSION_STATS, "v1")
    writer.write(load_config(path), "v1")
    accepted = {p.name: p.read_text() for p in (tmp_path / "xds").glob("*.json")}
    assert json.loads(accepted["rds.json"])["version_info"] == "v1"

    write(path, name="new", upstream="http://127.0.0.1:2", admin=admin.port)
    with pytest.raises(DeliveryError, match="did not accept config v2"):
        writer.write(load_config(path), "v2")  # the fake Envoy stays on v1
    assert {p.name: p.read_text() for p in (tmp_path / "xds").glob("*.json")} == accepted


def test_files_envoy_takes_are_delivered(tmp_path: Path, admin: FakeAdmin) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, admin=admin.port)
    writer = XdsWriter(tmp_path / "xds", accept_wait_s=5)
    threading.Timer(0.2, lambda: admin.versions.update(dict.fromkeys(VERSION_STATS, "v1"))).start()
    writer.write(load_config(path), "v1")  # returns once the fake Envoy shows v1
    assert admin.versions["lds"] == "v1"
