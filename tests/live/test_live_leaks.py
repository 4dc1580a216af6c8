"""Nothing the gateway writes ever holds a secret or a client credential.

One gateway goes through a busy life: injected keys on two kinds of route,
client keys and OAuth tokens (all through the processor: the fast path is off
so it sees every credential), gateway keys right and wrong, a 404, a secret
rotation, a secret file with a control character in it, and a raw gateway
key pasted into the keys file by mistake (both refused with an error).
Then everything it wrote and shows is scanned: both processes' logs (with the
access log), the rendered bootstrap and xDS files, the metrics page, Envoy's
admin pages, and the answers it gave itself. Every value is random per run,
so a hit can only be a leak. The scanner is checked to find a planted value.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from harness import RecordingUpstream, credential_route, http1, http2
from harness.keys import key_line
from harness.liveops import (
    LiveGateway,
    files_under,
    find_leaks,
    lines_with,
    poll,
    write_atomically,
)

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def random_hex() -> str:
    return secrets.token_hex(16)


class Values:
    """Every secret and client credential of the test; the random part is what is searched."""

    def __init__(self) -> None:
        self.core = {
            "server key from a file": random_hex(),
            "rotated server key": random_hex(),
            "rejected server key (control character)": random_hex(),
            "server key from the environment": random_hex(),
            "client x-api-key": random_hex(),
            "client key in a query string": random_hex(),
            "client OAuth token": random_hex(),
            "client OpenAI bearer": random_hex(),
            "gateway key": random_hex(),
            "wrong gateway key": random_hex(),
            "gateway key pasted into the keys file": random_hex(),
        }
        core = self.core
        self.file_key = f"sk-ant-api03-{core['server key from a file']}"
        self.rotated_key = f"sk-ant-api03-{core['rotated server key']}"
        self.bad_key = f"sk-ant-api03-{core['rejected server key (control character)']}\x01x"
        self.env_key = f"sk-proj-{core['server key from the environment']}"
        self.client_key = f"sk-ant-api03-{core['client x-api-key']}"
        self.query_key = f"sk-ant-api03-{core['client key in a query string']}"
        self.oauth = f"Bearer sk-ant-oat01-{core['client OAuth token']}"
        self.openai_bearer = f"Bearer sk-proj-{core['client OpenAI bearer']}"
        self.gateway_key = f"gk-{core['gateway key']}"
        self.wrong_gateway_key = f"gk-{core['wrong gateway key']}"
        self.pasted_key = f"gk-{core['gateway key pasted into the keys file']}"


def exercise(gateway: LiveGateway, upstream: RecordingUpstream, v: Values) -> dict[str, bytes]:
    """Requests of every kind, over HTTP/1.1 and HTTP/2; returns what the gateway answered."""
    key = {"x-gateway-key": v.gateway_key}
    requests = [
        ("/anthropic/v1/messages", key),
        ("/anthropic/v1/messages", {**key, "x-api-key": ""}),
        ("/anthropic/v1/messages", {"x-gateway-key": v.wrong_gateway_key}),
        ("/anthropic/v1/messages", {"x-api-key": v.client_key}),
        ("/anthropic/v1/messages", {"authorization": v.oauth}),
        (f"/anthropic/v1/messages?key={v.query_key}", {"x-api-key": v.client_key}),
        ("/openai/v1/chat/completions", key),
        ("/openai/v1/chat/completions", {"authorization": v.openai_bearer}),
        ("/nowhere/v1/messages", {**key, "x-api-key": v.client_key}),
    ]
    answers: dict[str, bytes] = {}
    statuses = set()
    for factory in (http1, http2):
        with factory(gateway.base_url) as client:
            for number, (path, headers) in enumerate(requests):
                reply = client.get(path, headers=headers)
                answers[f"answer {factory.__name__} #{number}"] = raw(reply)
                statuses.add(reply.status_code)
    assert statuses == {200, 401, 404}
    return answers


def raw(reply: httpx.Response) -> bytes:
    head = "".join(f"{name}: {value}\n" for name, value in reply.headers.items())
    return head.encode() + b"\n" + reply.content


def wait_failures(gateway: LiveGateway, count: int) -> None:
    gateway.wait_metric(
        "gateway_config_reloads_total", lambda value: value == count, result="failure"
    )


def admin_pages(gateway: LiveGateway) -> dict[str, bytes]:
    pages = ("/config_dump?include_eds", "/stats", "/clusters", "/listeners", "/server_info")
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.admin_port}", timeout=10) as admin:
        return {f"envoy admin {page}": admin.get(page).content for page in pages}


def test_no_secret_or_client_credential_appears_in_anything_the_gateway_writes_or_shows(
    start_live: Callable[..., LiveGateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    v = Values()
    inputs = tmp_path / "inputs"  # outside the gateway's folder: only the gateway writes there
    inputs.mkdir()
    key_file, keys_file = inputs / "anthropic.key", inputs / "gateway-keys.txt"
    key_file.write_text(v.file_key + "\n")
    good_keys = key_line("alice", v.gateway_key) + "\n"
    keys_file.write_text(good_keys)
    upstream = start_upstream("leak-upstream")
    routes = [
        credential_route("anthropic", upstream.url(), {"file": str(key_file)}),
        credential_route(
            "openai", upstream.url(), {"env": "OPENAI_KEY"}, header="authorization",
            format="Bearer {secret}", client_credentials=["authorization"],
        ),
    ]  # fmt: skip
    gateway = start_live(
        routes,
        env={"OPENAI_KEY": v.env_key},
        extproc={"fast_path": False},
        top={"access": {"keys_file": str(keys_file)}},
        envoy_log_level="info",
    )
    answers = exercise(gateway, upstream, v)
    assert [b"Bearer " + v.env_key.encode()] in [
        r.values("authorization") for r in upstream.requests
    ]

    # Refused changes first: a refused change is reported before the watcher moves on.
    write_atomically(key_file, v.bad_key.encode() + b"\n")
    wait_failures(gateway, 1)
    write_atomically(keys_file, (good_keys + f"bob {v.pasted_key}\n").encode())
    wait_failures(gateway, 2)
    write_atomically(keys_file, good_keys.encode())
    wait_failures(gateway, 3)  # the secret file is still refused
    write_atomically(key_file, v.rotated_key.encode() + b"\n")
    with http1(gateway.base_url) as client:

        def key_upstream_saw() -> list[bytes]:
            client.get("/anthropic/v1/messages", headers={"x-gateway-key": v.gateway_key})
            return upstream.requests[-1].values("x-api-key")

        poll(key_upstream_saw, lambda key: key == [v.rotated_key.encode()], "rotated key in use")
    answers.update(exercise(gateway, upstream, v))

    shown = {"metrics page": gateway.metrics_text().encode(), **admin_pages(gateway), **answers}
    gateway.stop()  # flushes Envoy's access log; stopping adds log lines of its own
    written = files_under(gateway.workdir)
    # The scan must have had something to find a leak in.
    names = {Path(path).name for path in written}
    assert {"extproc.log", "envoy.log", "envoy.yaml", "lds.json", "rds.json", "cds.json"} <= names
    assert len(gateway.access_log()) >= 36  # one line per request above, and the polls
    assert b"gateway_decisions_total" in shown["metrics page"]
    log = gateway.extproc_log.read_text()  # the refused changes were reported, by file
    assert len(list(lines_with(log, str(key_file)))) >= 2
    assert len(list(lines_with(log, str(keys_file)))) >= 1
    leaks = find_leaks({**written, **shown}, v.core)
    assert not leaks, "\n".join(leaks)
    # The gateway key header is removed before any upstream.
    assert not [r for r in upstream.requests if r.has("x-gateway-key")]


def test_leak_scanner_finds_a_planted_value_in_any_file_or_text(tmp_path: Path) -> None:
    planted = random_hex()
    nested = tmp_path / "xds" / ".hidden"
    nested.mkdir(parents=True)
    (tmp_path / "clean.log").write_text("nothing to see\n")
    (nested / ".lds.yaml.tmp").write_bytes(b"\x00\xffheader: " + planted.encode() + b"\n")
    found = find_leaks(files_under(tmp_path), {"planted": planted})
    assert found == [f"{nested / '.lds.yaml.tmp'}: planted"]
    assert find_leaks({"metrics": f'x{{client="{planted}"}} 1'.encode()}, {"p": planted}) == [
        "metrics: p"
    ]
    assert find_leaks(files_under(tmp_path), {"other": random_hex()}) == []
