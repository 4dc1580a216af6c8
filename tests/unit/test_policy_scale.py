"""The policy's structure does not grow with gateway clients (issue 13): proved by counts, not time."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from harness.keys import key_line
from harness.messages import headers_request

from extproc.config.load import load_config
from extproc.config.model import METADATA_NAMESPACE
from extproc.policy import responses
from extproc.policy.access import Identity
from extproc.policy.compiled import Policy, compile_policy
from extproc.policy.decision import Outcome
from extproc.policy.processor import process

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
access: {keys_file: keys.txt}
routes:
  - name: one
    prefix: /one
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: two
    prefix: /two
    upstream: https://api.openai.com/v1
    credential: {header: authorization, format: "Bearer {secret}", secret: {env: SERVER}}
  - {name: plain, prefix: /plain, upstream: 'https://example.com'}
"""
ENV = {"SERVER": "sk-server-scale"}


def write_keys(folder: Path, clients: int) -> None:
    lines = (key_line(f"client{n}", f"gk-key-{n}") for n in range(clients))
    (folder / "keys.txt").write_text("".join(line + "\n" for line in lines))


def compiled(folder: Path, clients: int, previous: Policy | None = None) -> Policy:
    write_keys(folder, clients)
    (folder / "gateway.yaml").write_text(CONFIG)
    return compile_policy(load_config(folder / "gateway.yaml"), ENV, previous)


def answer_count(policy: Policy) -> int:
    return sum(route.answers.count for route in policy.routes.values())


def test_the_number_of_precomputed_answers_does_not_depend_on_the_number_of_clients(
    tmp_path: Path,
) -> None:
    few = compiled(tmp_path, 2)
    many = compiled(tmp_path, 2000)
    assert answer_count(few) == answer_count(many) > 0
    for policy, clients in ((few, 2), (many, 2000)):
        [table] = policy.keys.values()
        assert len(table.by_digest) == clients


def test_a_keys_file_shared_by_routes_is_read_and_held_once(tmp_path: Path) -> None:
    policy = compiled(tmp_path, 5)
    tables = {id(route.rule.keys.table) for route in policy.routes.values() if route.rule.keys}
    assert len(policy.keys) == 1 and len(tables) == 1
    assert next(iter(policy.keys.values())) is next(
        route.rule.keys.table for route in policy.routes.values() if route.rule.keys
    )


def test_a_keys_file_change_does_not_rebuild_route_answers(tmp_path: Path) -> None:
    before = compiled(tmp_path, 5)
    after = compiled(tmp_path, 6, previous=before)
    assert after.routes.keys() == before.routes.keys()
    for name, route in after.routes.items():
        assert route.answers is before.routes[name].answers
    assert after.version != before.version
    [table] = after.keys.values()
    assert table.identify(b"gk-key-5") == Identity("client5")


def test_an_unchanged_keys_file_is_not_parsed_again(tmp_path: Path) -> None:
    before = compiled(tmp_path, 5)
    after = compiled(tmp_path, 5, previous=before)
    assert next(iter(after.keys.values())) is next(iter(before.keys.values()))
    assert after.version == before.version


def test_a_secret_change_rebuilds_the_answers_that_carry_it(tmp_path: Path) -> None:
    before = compiled(tmp_path, 5)
    config = load_config(tmp_path / "gateway.yaml")
    after = compile_policy(config, {"SERVER": "sk-rotated"}, before)
    for name, route in after.routes.items():
        if route.name == "plain":
            assert route.answers is before.routes[name].answers
        else:
            assert route.answers is not before.routes[name].answers
    assert after.version != before.version


@pytest.mark.parametrize("clients", [1, 50])
def test_every_client_is_named_in_its_answer(tmp_path: Path, clients: int) -> None:
    policy = compiled(tmp_path, clients)
    names = {route.name: envoy for envoy, route in policy.routes.items()}
    for n in range(clients):
        request = headers_request(names["one"], [("x-api-key", f"gk-key-{n}".encode())])
        answer = process(policy, request)
        assert (answer.outcome, answer.client) == (Outcome.INJECTED, f"client{n}")
        meta = pb.ProcessingResponse.FromString(answer.payload).dynamic_metadata
        assert meta.fields[METADATA_NAMESPACE].struct_value.fields["client"].string_value == (
            f"client{n}"
        )


@pytest.mark.parametrize("client", ["", "a", "x" * 63, "c" * 200])
@pytest.mark.parametrize("outcome", list(Outcome))
def test_appended_metadata_equals_the_message_protobuf_would_build(
    outcome: Outcome, client: str
) -> None:
    """Concatenated bytes parse into exactly the answer built the slow way."""
    body = responses.mutate("x-api-key", b"sk-value", ("authorization",))
    route = "r" * 150  # long enough for multi-byte lengths
    fast = pb.ProcessingResponse.FromString(
        responses.with_metadata(body, responses.metadata_fields(route, outcome), client)
    )
    fields = {
        "route": route,
        "credential_source": outcome.credential_source,
        "outcome": outcome.value,
    }
    if client:
        fields["client"] = client
    slow = pb.ProcessingResponse.FromString(body)
    meta = struct_pb2.Struct()
    meta.update({METADATA_NAMESPACE: fields})
    slow.dynamic_metadata.CopyFrom(meta)
    assert fast == slow
