"""An expired gateway key is refused by the processor: 401 in the route's shape, the key unnamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.messages import headers_request

from extproc.config.load import load_config
from extproc.policy.access import key_digest
from extproc.policy.compiled import Policy, compile_policy
from extproc.policy.decision import Outcome
from extproc.policy.processor import process

OLD, NEW = "gk-old-key-of-alice", "gk-new-key-of-alice"
NEW_YEAR = 1798761600.0  # 2027-01-01T00:00:00Z, alice's old key's expiry
GATEWAY = """\
listener: {address: 127.0.0.1, port: 4000}
access: {keys_file: keys}
routes:
  - {name: claude, prefix: /a/, upstream: 'https://api.anthropic.com',
     credential: {header: x-api-key, secret: {env: K}}}
  - {name: gpt, prefix: /o/, upstream: 'https://api.openai.com', error_style: openai,
     credential: {header: authorization, format: 'Bearer {secret}', secret: {env: K}}}
"""


def keyed_policy(folder: Path) -> tuple[Policy, dict[str, str]]:
    (folder / "keys").write_text(
        f"alice sha256:{key_digest(OLD)} expires=2027-01-01 teams=ml\n"
        f"alice sha256:{key_digest(NEW)} teams=ml\n"
    )
    (folder / "gateway.yaml").write_text(GATEWAY)
    config = load_config(folder / "gateway.yaml")
    return compile_policy(config, {"K": "server"}), {r.name: r.envoy_name for r in config.routes}


def ask(policy: Policy, route: str, key: str, now: float) -> tuple[Outcome | None, bytes]:
    request = headers_request(route, [("x-api-key", key.encode())])
    answer = process(policy, request, clock=lambda: now)
    reply = pb.ProcessingResponse.FromString(answer.payload)
    return answer.outcome, reply.immediate_response.body


@pytest.mark.parametrize(
    ("case", "key", "now", "outcome"),
    [
        ("old key before its expiry", OLD, NEW_YEAR - 1, Outcome.INJECTED),
        ("old key at its expiry", OLD, NEW_YEAR, Outcome.EXPIRED),
        ("old key after its expiry", OLD, NEW_YEAR + 86400, Outcome.EXPIRED),
        ("new key, no expiry, any time", NEW, NEW_YEAR * 2, Outcome.INJECTED),
    ],
)
def test_a_key_works_until_its_expiry_and_is_refused_from_then_on(
    tmp_path: Path, case: str, key: str, now: float, outcome: Outcome
) -> None:
    policy, names = keyed_policy(tmp_path)
    assert ask(policy, names["claude"], key, now)[0] is outcome


@pytest.mark.parametrize(
    ("route", "field", "kind"),
    [("claude", "type", "authentication_error"), ("gpt", "code", "invalid_api_key")],
)
def test_an_expired_key_gets_a_401_in_the_routes_shape_saying_so(
    tmp_path: Path, route: str, field: str, kind: str
) -> None:
    policy, names = keyed_policy(tmp_path)
    request = headers_request(names[route], [("authorization", f"Bearer {OLD}".encode())])
    answer = process(policy, request, clock=lambda: NEW_YEAR)
    immediate = pb.ProcessingResponse.FromString(answer.payload).immediate_response
    body = json.loads(immediate.body)
    assert (answer.outcome, answer.client, immediate.status.code) == (Outcome.EXPIRED, "alice", 401)
    assert body["error"][field] == kind
    assert "expired" in body["error"]["message"] and OLD not in immediate.body.decode()


def test_a_valid_key_carries_its_clients_teams_to_the_answer(tmp_path: Path) -> None:
    policy, names = keyed_policy(tmp_path)
    answer = process(policy, headers_request(names["claude"], [("x-api-key", NEW.encode())]))
    assert (answer.outcome, answer.client, answer.teams) == (Outcome.INJECTED, "alice", ("ml",))


def test_the_clock_is_read_only_for_a_valid_key(tmp_path: Path) -> None:
    policy, names = keyed_policy(tmp_path)
    reads: list[None] = []

    def clock() -> float:
        reads.append(None)
        return 0.0

    for headers in ([], [("x-api-key", b"gk-mistyped")], [("x-api-key", b"sk-ant-own")]):
        process(policy, headers_request(names["claude"], headers), clock=clock)
    assert reads == []
    process(policy, headers_request(names["claude"], [("x-api-key", NEW.encode())]), clock=clock)
    assert len(reads) == 1
