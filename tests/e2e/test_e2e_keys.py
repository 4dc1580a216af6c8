"""The key commands (docs/keys-and-access.md) against a running gateway: real Envoy, real
processor, live reload.

An operator rotates a client's key with overlap (both keys work), revokes the
old one (401), rotates with no overlap (the old key answers "expired") and
revokes the client, all without a restart; no gateway key reaches the upstream
or a log.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Gateway, RecordingUpstream, base_env, credential_route, raw_request
from harness.adversary import leaks, poll
from harness.gateway import ROOT

from extproc.policy.access import key_digest

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes

SERVER_KEY = "sk-ant-api03-server-key-keys"


def keys(*argv: str) -> str:
    """Run ``python -m extproc keys …`` as an operator would; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "keys", *argv],
        env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def new_key(output: str) -> str:
    return next(word for word in output.split() if word.startswith("gk-"))


def test_rotate_overlap_revoke_and_expiry_apply_live(
    start_gateway: Callable[..., Gateway], upstream: RecordingUpstream, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.txt"
    first = new_key(keys("add", str(keys_file), "alice", "--team", "ml"))
    gateway = start_gateway(
        [credential_route("keyed", upstream.url())],
        env={"KEYED_KEY": SERVER_KEY},
        top={"access": {"keys_file": str(keys_file)}},
    )
    processor = gateway.extproc_process

    def status(key: str) -> int:
        return raw_request(gateway.listener_port, "/keyed/v1/m", [("x-api-key", key)]).status

    assert status(first) == 200
    second = new_key(keys("rotate", str(keys_file), "alice", "--overlap", "1h"))
    poll(lambda: status(second) == 200, "accepting the rotated key")
    assert status(first) == 200  # the overlap: both keys work

    keys("revoke", str(keys_file), "alice", "--key", key_digest(first)[:8])
    poll(lambda: status(first) == 401, "refusing the revoked key")
    assert status(second) == 200

    third = new_key(keys("rotate", str(keys_file), "alice", "--overlap", "0"))
    poll(lambda: status(third) == 200, "accepting the key rotated without overlap")
    expired = raw_request(gateway.listener_port, "/keyed/v1/m", [("x-api-key", second)])
    assert expired.status == 401 and expired.header("content-type") == b"application/json"
    body = expired.json()
    assert body["error"]["type"] == "authentication_error"
    assert "expired" in body["error"]["message"]

    keys("revoke", str(keys_file), "alice")
    poll(lambda: status(third) == 401, "refusing every key of the revoked client")

    assert gateway.extproc_process is processor and processor is not None
    assert processor.poll() is None  # all of it live, no restart
    for seen in upstream.requests:
        assert seen.values("x-api-key") == [SERVER_KEY.encode()]
    assert leaks([first, second, third], gateway.logs(), expired.body) == []
    logged = gateway.wait_access_log(lambda entry: entry.get("outcome") == "expired")
    assert logged["client"] == "alice"  # the name, never the key
