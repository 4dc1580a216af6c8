"""Secret rotation under load: the new key is used soon, and no request ever goes without one.

The upstream tells each client which key it received (``old``, ``new`` or
what else), so the client side can check causality without any clock: once
one response has shown the new key, every request sent after it must carry
the new key too. The time from the rotation to the first request that carried
the new key is printed (run with ``-s`` to see it); the README promises about
1.5 s, the test waits at most ``ROTATION_DEADLINE_S`` so a loaded machine
does not fail it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import RecordedRequest, RecordingUpstream, Reply, credential_route
from harness.liveops import (
    CONFIG_HEALTH,
    NOT_SERVING,
    SERVING,
    KubeMount,
    LiveGateway,
    Sent,
    Traffic,
    lines_with,
    steady_senders,
    write_atomically,
)

OLD_KEY = "sk-ant-api03-rotation-old-key-0001"
NEW_KEY = "sk-ant-api03-rotation-new-key-0002"
PATH = "/anthropic/v1/messages"
ROTATION_DEADLINE_S = 10.0  # generous: the documented window is about 1.5 s
SENDERS = steady_senders(PATH)

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def name_the_key(request: RecordedRequest) -> Reply:
    """Answer with which key arrived, never the key itself."""
    values = request.values("x-api-key")
    names = {(OLD_KEY.encode(),): "old", (NEW_KEY.encode(),): "new"}
    key = names.get(tuple(values), f"unexpected: {len(values)} value(s)")
    return Reply(200, json.dumps({"key": key}).encode())


def key_seen(sent: Sent) -> str:
    return str(json.loads(sent.body)["key"]) if sent.status == 200 else f"status {sent.status}"


class SecretFile:
    """A secret file and one way of rotating it."""

    def __init__(self, folder: Path, how: str) -> None:
        self.how = how
        self.mount = KubeMount(folder / "secret") if how == "kubernetes_symlink_swap" else None
        self.path = self.mount.path("key") if self.mount else folder / "key"
        self.write(OLD_KEY + "\n")

    def write(self, text: str) -> None:
        if self.mount is not None:
            self.mount.write({"key": text.encode()})
        elif self.how == "atomic_rename":
            write_atomically(self.path, text.encode())
        else:
            self.path.write_text(text)  # truncate and rewrite the same inode: not atomic


@pytest.fixture
def keyed_upstream(start_upstream: Callable[..., RecordingUpstream]) -> RecordingUpstream:
    return start_upstream("keyed-upstream", responder=name_the_key)


@pytest.mark.parametrize("how", ["kubernetes_symlink_swap", "in_place_rewrite"])
def test_rotated_secret_is_used_soon_and_no_request_goes_without_a_key_or_fails(
    start_live: Callable[..., LiveGateway],
    keyed_upstream: RecordingUpstream,
    tmp_path: Path,
    how: str,
) -> None:
    secret = SecretFile(tmp_path, how)
    gateway = start_live(
        [credential_route("anthropic", keyed_upstream.url(), {"file": str(secret.path)})]
    )
    with Traffic(gateway.base_url, SENDERS) as traffic:
        traffic.wait_count(20)
        rotated_at = time.monotonic()
        secret.write(NEW_KEY + "\n")
        sent = traffic.wait(
            lambda sent: any(key_seen(s) == "new" for s in sent),
            "a request carrying the new key",
            ROTATION_DEADLINE_S,
        )
        first_new = min((s for s in sent if key_seen(s) == "new"), key=lambda s: s.started)
        traffic.wait(
            lambda sent: sum(key_seen(s) == "new" for s in sent) >= 40, "more new-key requests"
        )
    sent = traffic.sent()
    print(f"{how}: new key in use {first_new.started - rotated_at:.2f}s after the rotation")
    assert {key_seen(s) for s in sent} == {"old", "new"}  # no 5xx, no error, no other key
    assert all(
        r.values("x-api-key") in ([OLD_KEY.encode()], [NEW_KEY.encode()])
        for r in keyed_upstream.requests
    )
    switched = min(s.ended for s in sent if key_seen(s) == "new")
    late = [s for s in sent if s.started > switched and key_seen(s) != "new"]
    assert not late, (
        f"{len(late)} requests sent after the new key was in use got another: {late[:3]}"
    )


@pytest.mark.parametrize("broken", ["", "\n"], ids=["empty", "only_a_newline"])
def test_unusable_rotated_secret_keeps_the_old_key_and_reports_it_until_a_good_one_arrives(
    start_live: Callable[..., LiveGateway],
    keyed_upstream: RecordingUpstream,
    tmp_path: Path,
    broken: str,
) -> None:
    secret = SecretFile(tmp_path, "atomic_rename")
    gateway = start_live(
        [credential_route("anthropic", keyed_upstream.url(), {"file": str(secret.path)})]
    )
    with Traffic(gateway.base_url, SENDERS[:2]) as traffic:
        traffic.wait_count(10)
        secret.write(broken)
        gateway.wait_metric("gateway_config_last_reload_success", lambda v: v == 0)
        gateway.wait_health(CONFIG_HEALTH, NOT_SERVING)
        reported_at = time.monotonic()
        traffic.wait_count(10, after=reported_at)
        fixed_at = time.monotonic()
        secret.write(NEW_KEY + "\n")
        gateway.wait_metric("gateway_config_last_reload_success", lambda v: v == 1)
        gateway.wait_health(CONFIG_HEALTH, SERVING)
        traffic.wait(lambda sent: sum(key_seen(s) == "new" for s in sent) >= 10, "new-key requests")
    sent = traffic.sent()
    assert {key_seen(s) for s in sent} == {"old", "new"}
    assert all(key_seen(s) == "old" for s in sent if s.ended < fixed_at)
    reported = list(lines_with(gateway.extproc_log.read_text(), str(secret.path)))
    assert len(reported) == 1, reported
    assert "empty" in reported[0]
