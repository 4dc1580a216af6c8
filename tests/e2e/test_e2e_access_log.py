"""Envoy's access log is written out promptly, so an operator can watch requests as they happen.

Envoy buffers its access log and by default writes it out every 10 s; the
gateway starts Envoy with a shorter flush interval everywhere it runs Envoy.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import RecordingUpstream, http1
from harness.gateway import ROOT
from harness.liveops import UpProcess, poll, running_up

from extproc.runtime.processes import FILE_FLUSH_INTERVAL_MS

SERVER_KEY = "sk-ant-api03-server-key-access-log"
PROMPT_S = 2.0  # the flush interval is 0.5 s; Envoy's default (10 s) would miss this by far
FLAG = "--file-flush-interval-msec"


@pytest.fixture
def up(
    tmp_path: Path, upstream: RecordingUpstream, watch: Callable[..., None]
) -> Iterator[UpProcess]:
    with running_up(tmp_path / "up", upstream, watch, SERVER_KEY) as process:
        yield process


def access_log_entries(up: UpProcess, path: str) -> list[dict[str, Any]]:
    """The JSON access-log lines in ``up``'s output for requests to ``path``."""
    entries = []
    for line in up.output().splitlines():
        if line.startswith("{") and path in line:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line still being written
    return entries


@pytest.mark.slow  # starts real Envoy and processor processes
def test_up_writes_each_requests_access_log_line_within_two_seconds(
    up: UpProcess, upstream: RecordingUpstream
) -> None:
    # Envoy writes its first line at once whatever the interval, so later ones are the test.
    for number in range(3):
        path = f"/anthropic/v1/access-log-{number}-{uuid.uuid4().hex}"
        with http1(up.base_url) as client:
            assert client.get(path).status_code == 200
        entries = poll(
            partial(access_log_entries, up, path),
            bool,
            f"access log line for request {number}",
            deadline_s=PROMPT_S,
        )
        assert [(e["status"], e["credential_source"]) for e in entries] == [(200, "injected")]
    assert [r.values("x-api-key") for r in upstream.requests] == [[SERVER_KEY.encode()]] * 3


def flush_interval(command: list[str]) -> int | None:
    return int(command[command.index(FLAG) + 1]) if FLAG in command else None


def test_compose_and_kubernetes_start_envoy_with_the_same_flush_interval_as_up() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    pod = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    containers = pod["spec"]["template"]["spec"]["containers"]
    envoy = next(c for c in containers if c["name"] == "envoy")
    assert flush_interval(compose["services"]["envoy"]["command"]) == FILE_FLUSH_INTERVAL_MS
    assert flush_interval(envoy["command"]) == FILE_FLUSH_INTERVAL_MS
