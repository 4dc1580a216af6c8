"""Live config reload while requests keep flowing.

Client threads (HTTP/1.1 and HTTP/2) send credential-less requests without a
pause while the YAML changes under the running gateway. The promises checked:
no request fails or is reset, and the old upstream only ever receives the old
key, the new upstream only the new one, whichever config routed the request.
A broken change is ignored (the old config keeps serving), reported once in
the processor's log, and shown in metrics and gRPC health until a good change
arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import RecordingUpstream, credential_route
from harness.liveops import (
    CONFIG_HEALTH,
    NOT_SERVING,
    SERVING,
    LiveGateway,
    Sent,
    Traffic,
    by_number,
    lines_with,
    poll,
    steady_senders,
)

from extproc.runtime.reload import POLL_SECONDS

OLD_KEY = "sk-ant-api03-reload-old-key"
NEW_KEY = "sk-ant-api03-reload-new-key"
PATH = "/anthropic/v1/messages"
SENDERS = steady_senders(PATH)

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


class Setup:
    """Two recording upstreams, and a key file for each."""

    def __init__(self, folder: Path, start_upstream: Callable[..., RecordingUpstream]) -> None:
        self.old = start_upstream("old-upstream")
        self.new = start_upstream("new-upstream")
        folder.mkdir()
        self.old_key_file = folder / "old.key"
        self.new_key_file = folder / "new.key"
        self.old_key_file.write_text(OLD_KEY + "\n")
        self.new_key_file.write_text(NEW_KEY + "\n")

    def old_route(self) -> dict[str, object]:
        return credential_route("anthropic", self.old.url(), {"file": str(self.old_key_file)})

    def new_route(self) -> dict[str, object]:
        return credential_route("anthropic", self.new.url(), {"file": str(self.new_key_file)})

    def assert_each_upstream_saw_only_its_own_key(self) -> None:
        for upstream, key in ((self.old, OLD_KEY), (self.new, NEW_KEY)):
            wrong = [r for r in upstream.requests if r.values("x-api-key") != [key.encode()]]
            assert not wrong, (
                f"{upstream.name}: {len(wrong)} of {len(upstream.requests)} requests without "
                f"exactly its own key, e.g. x-api-key {wrong[0].values('x-api-key')}"
            )


@pytest.fixture
def setup(tmp_path: Path, start_upstream: Callable[..., RecordingUpstream]) -> Setup:
    return Setup(tmp_path / "secrets", start_upstream)


def assert_all_succeeded(sent: list[Sent]) -> None:
    failed = [s for s in sent if s.status != 200]
    assert not failed, f"{len(failed)} of {len(sent)} requests failed, e.g. {failed[:3]}"


@pytest.mark.parametrize(
    "config_mount", [False, True], ids=["yaml_replaced_by_rename", "configmap_data_symlink_swap"]
)
def test_moving_a_route_to_a_new_upstream_and_secret_under_load_fails_no_request_and_sends_each_key_only_to_its_own_upstream(
    start_live: Callable[..., LiveGateway], setup: Setup, config_mount: bool
) -> None:
    gateway = start_live([setup.old_route()], config_mount=config_mount)
    with Traffic(gateway.base_url, SENDERS) as traffic:
        traffic.wait_count(20)
        gateway.reconfigure([setup.new_route()])
        poll(lambda: len(setup.new.requests), lambda n: n >= 40, "requests at the new upstream")
    sent = traffic.sent()
    assert_all_succeeded(sent)  # no 5xx, no reset, no refused connection
    setup.assert_each_upstream_saw_only_its_own_key()
    arrived = set(by_number(setup.old)) | set(by_number(setup.new))
    assert arrived == {s.number for s in sent}  # every request reached an upstream
    assert setup.old.requests, "the old config never served"


def break_yaml_syntax(gateway: LiveGateway, setup: Setup) -> str:
    gateway.write_raw_yaml(gateway.config_path.read_text() + "  - [not closed\n")
    return "not valid YAML"


def break_a_field(gateway: LiveGateway, setup: Setup) -> str:
    """Points the route at the new upstream and key, with one invalid field beside them."""
    gateway.reconfigure([{**setup.new_route(), "retries": "many"}])
    line = next(
        number
        for number, text in enumerate(gateway.config_path.read_text().splitlines(), 1)
        if text.strip().startswith("retries:")
    )
    return f"gateway.yaml:{line} routes[0].retries"


BREAKERS = {"yaml_syntax_error": break_yaml_syntax, "invalid_field": break_a_field}


@pytest.mark.parametrize("breaker", BREAKERS.values(), ids=BREAKERS.keys())
def test_broken_yaml_keeps_the_old_config_serving_logs_once_and_shows_in_metrics_and_health_until_fixed(
    start_live: Callable[..., LiveGateway],
    setup: Setup,
    breaker: Callable[[LiveGateway, Setup], str],
) -> None:
    gateway = start_live([setup.old_route()])
    assert gateway.metric("gateway_config_last_reload_success") == 1
    assert gateway.health(CONFIG_HEALTH) == SERVING
    with Traffic(gateway.base_url, SENDERS[:2]) as traffic:
        traffic.wait_count(10)
        problem = breaker(gateway, setup)
        gateway.wait_metric("gateway_config_last_reload_success", lambda v: v == 0)
        failed_at = time.monotonic()
        failures = gateway.metric("gateway_config_reloads_total", result="failure")
        assert failures is not None and failures >= 1
        gateway.wait_health(CONFIG_HEALTH, NOT_SERVING)
        assert gateway.health() == SERVING  # the processor itself still serves the old config
        # Traffic goes on across a few of the watcher's polls of the unchanged broken file.
        traffic.wait_count(1, after=failed_at + 2.5 * POLL_SECONDS)
        fixed_at = time.monotonic()
        gateway.reconfigure([setup.new_route()])
        gateway.wait_metric("gateway_config_last_reload_success", lambda v: v == 1)
        gateway.wait_health(CONFIG_HEALTH, SERVING)
        poll(lambda: len(setup.new.requests), lambda n: n >= 5, "requests at the new upstream")
    sent = traffic.sent()
    assert_all_succeeded(sent)
    setup.assert_each_upstream_saw_only_its_own_key()
    started = {s.number: s.started for s in sent}
    assert all(started[n] > fixed_at for n in by_number(setup.new)), "broken config was applied"
    log = gateway.extproc_log.read_text()
    assert len(list(lines_with(log, problem))) == 1, log


def test_a_change_envoy_cannot_take_is_served_by_neither_and_is_retried_until_it_can(
    start_live: Callable[..., LiveGateway], setup: Setup
) -> None:
    """A route file that cannot be written: the processor stays on the old config too.

    ``rds.json`` is made a directory (so no write succeeds, even as root); Envoy
    keeps its routes. Once the file can be written again, the same change is
    delivered without another edit.
    """
    gateway = start_live([setup.old_route()])
    assert gateway.xds_dir is not None
    routes_file = gateway.xds_dir / "rds.json"
    kept = routes_file.with_name("rds.kept")
    with Traffic(gateway.base_url, SENDERS[:2]) as traffic:
        traffic.wait_count(10)
        routes_file.replace(kept)
        routes_file.mkdir()
        gateway.reconfigure([setup.new_route()])
        gateway.wait_metric("gateway_config_last_reload_success", lambda v: v == 0)
        gateway.wait_health(CONFIG_HEALTH, NOT_SERVING)
        failed_at = time.monotonic()
        traffic.wait_count(10, after=failed_at + 1.0)
        assert not setup.new.requests, "Envoy or the processor took the undelivered config"
        routes_file.rmdir()
        kept.replace(routes_file)
        gateway.wait_metric("gateway_config_last_reload_success", lambda v: v == 1)
        poll(lambda: len(setup.new.requests), lambda n: n >= 5, "requests at the new upstream")
    assert_all_succeeded(traffic.sent())
    setup.assert_each_upstream_saw_only_its_own_key()
    log = gateway.extproc_log.read_text()
    assert "not delivered" in log and "trying again" in log
