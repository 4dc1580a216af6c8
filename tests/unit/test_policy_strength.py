"""Cases that pin down the per-request path where broader tests let a wrong change pass.

Each table here was written against a mutation run (mutmut) of one module:
the decision, the keys table, the compiled answers, the answer bytes, the
processor and the rendered fast-path matchers. A case exists because some
plausible wrong version of the code passed every other fast test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.keys import key_line
from harness.messages import Headers, headers_request

from extproc.config.load import load_config
from extproc.config.model import (
    METADATA_NAMESPACE,
    CredentialMode,
    ErrorStyle,
    GatewayConfig,
    Limit,
    StoreFailure,
)
from extproc.config.sections import ConfigError
from extproc.policy import responses
from extproc.policy.access import (
    GatewayKeys,
    Identity,
    KeysFileError,
    KeyTable,
    new_key,
    read_keys,
)
from extproc.policy.compiled import CompiledRoute, Policy, compile_policy
from extproc.policy.decision import Decision, Outcome, RouteRule, decide, token_of
from extproc.policy.limits import Admission, LimitTable, Refusal
from extproc.policy.processor import Answer, MalformedRequest, process
from extproc.policy.responses import PHASE_REPLIES
from extproc.render.common import EXTPROC_FILTER, METERING_FILTER
from extproc.render.listener import connection_manager
from extproc.render.routes import route_config

PREFER, REPLACE = CredentialMode.PREFER_CLIENT, CredentialMode.REPLACE_CLIENT
REJECT, CLIENT_ONLY = CredentialMode.REJECT_CLIENT, CredentialMode.CLIENT_ONLY
CREDENTIALS = frozenset({"authorization", "x-api-key"})
ALICE_KEYS = GatewayKeys(
    "x-gateway-key",
    KeyTable(MappingProxyType({hashlib.sha256(b"gk-alice").digest(): Identity("alice")})),
    for_client_credentials=False,
)
OAUTH = ("authorization", b"Bearer sk-ant-oat01-x")
OWN_KEY = ("x-api-key", b"sk-ant-api03-own")
BEARER_KEY = ("authorization", b"Bearer gk-alice")
SLOT_KEY = ("x-api-key", b"gk-alice")


def rule(mode: CredentialMode = PREFER, *, header: str = "x-api-key", secret: bool = True,
         keys: GatewayKeys | None = ALICE_KEYS, forward_only: bool = False) -> RouteRule:  # fmt: skip
    return RouteRule(header, CREDENTIALS, secret, keys, mode, frozenset({b"dummy"}), forward_only)


# -- the decision: every mode's outcome, removal list and client name ---------------------

DECISION_CASES = [
    # prefer_client
    ("prefer_client, own key and a Bearer gateway key: client pays, the key is removed, named",
     rule(PREFER), [OWN_KEY, BEARER_KEY], Decision(Outcome.CLIENT_API_KEY, ("authorization",), "alice")),
    ("prefer_client, OAuth and a gateway key in x-api-key on a bearer route: the key is removed, not overwritten",
     rule(PREFER, header="authorization"), [OAUTH, SLOT_KEY], Decision(Outcome.CLIENT_AUTHORIZATION, ("x-api-key",), "alice")),
    ("prefer_client, gateway key as Bearer and a placeholder x-api-key: injected over the placeholder, Bearer removed",
     rule(PREFER), [BEARER_KEY, ("x-api-key", b"dummy")], Decision(Outcome.INJECTED, ("authorization",), "alice")),
    ("prefer_client, gateway key in x-api-key and a blank Authorization on a bearer route: x-api-key removed, Authorization overwritten",
     rule(PREFER, header="authorization"), [SLOT_KEY, ("authorization", b"Bearer ")], Decision(Outcome.INJECTED, ("x-api-key",), "alice")),
    # replace_client
    ("replace_client, OAuth and own key with a gateway key: both removed but the injected header, named",
     rule(REPLACE), [OAUTH, OWN_KEY, ("x-gateway-key", b"gk-alice")], Decision(Outcome.REPLACED, ("authorization",), "alice")),
    ("replace_client on a bearer route, own x-api-key and a Bearer gateway key: x-api-key removed, Authorization overwritten",
     rule(REPLACE, header="authorization"), [OWN_KEY, BEARER_KEY], Decision(Outcome.REPLACED, ("x-api-key",), "alice")),
    ("replace_client without keys, OAuth: removed, replaced, nobody named",
     rule(REPLACE, keys=None), [OAUTH], Decision(Outcome.REPLACED, ("authorization",))),
    # reject_client
    ("reject_client, own key and a Bearer gateway key: refused, nothing removed, named",
     rule(REJECT), [OWN_KEY, BEARER_KEY], Decision(Outcome.REFUSED, client="alice")),
    ("reject_client without keys, own key: refused, nobody named",
     rule(REJECT, keys=None), [OWN_KEY], Decision(Outcome.REFUSED)),
    ("reject_client, gateway key alone: injected, named",
     rule(REJECT), [BEARER_KEY], Decision(Outcome.INJECTED, ("authorization",), "alice")),
    # client_only
    ("client_only, own key and a gateway key: client pays, the key is removed, named",
     rule(CLIENT_ONLY, secret=False), [OAUTH, SLOT_KEY], Decision(Outcome.CLIENT_AUTHORIZATION, ("x-api-key",), "alice")),
    ("client_only, a placeholder only: rejected, nothing removed",
     rule(CLIENT_ONLY, secret=False, keys=None), [("x-api-key", b"dummy")], Decision(Outcome.REJECTED)),
    ("client_only, gateway key as Bearer and nothing else: rejected, named, nothing removed (no upstream call)",
     rule(CLIENT_ONLY, secret=False), [BEARER_KEY], Decision(Outcome.REJECTED, client="alice")),
    # forward-only
    ("forward-only, a gateway key in the slot the rule names: removed (nothing overwrites it)",
     rule(header="x-api-key", secret=False, forward_only=True), [SLOT_KEY], Decision(Outcome.FORWARDED, ("x-api-key",), "alice")),
    ("forward-only, keys in both slots: both removed, named",
     rule(header="", secret=False, forward_only=True), [SLOT_KEY, BEARER_KEY], Decision(Outcome.FORWARDED, ("authorization", "x-api-key"), "alice")),
    ("forward-only, a key only in the access header: forwarded, nobody named (Envoy strips it)",
     rule(header="", secret=False, forward_only=True), [("x-gateway-key", b"gk-alice")], Decision(Outcome.FORWARDED)),
    ("forward-only, own key and a gateway key in the slot the rule names: client pays, the key removed",
     rule(header="x-api-key", secret=False, forward_only=True), [OAUTH, SLOT_KEY], Decision(Outcome.CLIENT_AUTHORIZATION, ("x-api-key",), "alice")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "headers", "expected"),
    [c[1:] for c in DECISION_CASES],
    ids=[c[0] for c in DECISION_CASES],
)
def test_each_mode_removes_exactly_the_gateway_keys_and_names_the_client(
    rule: RouteRule, headers: list[tuple[str, bytes]], expected: Decision
) -> None:
    assert decide(rule, headers) == expected


BLANK_CASES = [
    ("an empty x-api-key is blank", "x-api-key", b"", True),
    ("white space is blank", "x-api-key", b" \t", True),
    ("a scheme alone is a blank Authorization", "authorization", b"Bearer ", True),
    ("a scheme alone is a value in another header", "x-api-key", b"Bearer ", False),
    ("a scheme and a token is not blank", "authorization", b"Bearer t", False),
    ("a bare token is not blank", "x-api-key", b"sk-1", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "blank"), [c[1:] for c in BLANK_CASES], ids=[c[0] for c in BLANK_CASES]
)
def test_a_blank_credential_has_no_token(name: str, value: bytes, blank: bool) -> None:
    assert (not token_of(name, value)) is blank


# -- the keys file ------------------------------------------------------------------------

ALICE = key_line("alice", "gk-alice")


def test_a_keys_file_that_is_not_utf8_is_named_with_the_reason(tmp_path) -> None:
    (tmp_path / "keys").write_bytes(ALICE.encode() + b"  # caf\xe9\n")
    with pytest.raises(KeysFileError) as caught:
        read_keys(tmp_path / "keys")
    assert str(caught.value) == f"keys file {tmp_path}/keys cannot be read: not UTF-8 text"


def test_a_comment_starts_at_the_first_hash_of_a_line(tmp_path) -> None:
    (tmp_path / "keys").write_text(f"{ALICE}  # laptop # old one\n# {key_line('bob', 'gk-b')}\n")
    table = read_keys(tmp_path / "keys")
    assert dict(table.by_digest) == {hashlib.sha256(b"gk-alice").digest(): Identity("alice")}


def test_one_key_listed_for_two_names_names_the_first_owner(tmp_path) -> None:
    (tmp_path / "keys").write_text(f"{ALICE}\n{key_line('bob', 'gk-alice')}\n")
    with pytest.raises(KeysFileError) as caught:
        read_keys(tmp_path / "keys")
    assert str(caught.value) == f"{tmp_path}/keys:2: the same key is listed for 'alice'"


def test_a_new_key_is_the_prefix_and_256_random_bits_url_safe() -> None:
    key = new_key()
    assert key.startswith("gk-") and len(key) == len("gk-") + 43  # 32 bytes in base64url
    assert set(key[3:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert new_key() != key


def test_key_line_refuses_a_name_the_file_would_reject_and_says_what_to_use() -> None:
    with pytest.raises(ValueError) as caught:
        key_line("a b", "gk-x")
    assert str(caught.value) == "client name 'a b': use letters, digits, '.', '_', '@' and '-'"


# -- compiled answers, through the processor ----------------------------------------------

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
placeholders: [dummy]
access: {keys_file: keys.txt}
limits: {on_store_error: closed, clients: {alice: {requests_per_minute: 10}}}
routes:
  - name: keyed
    prefix: /keyed
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: strict
    prefix: /strict
    upstream: https://api.anthropic.com
    access: {keys_file: keys.txt, header: x-team-key, for_client_credentials: true}
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: open
    prefix: /open
    upstream: https://api.anthropic.com
    access: false
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: replace
    prefix: /replace
    upstream: https://api.openai.com/v1
    error_style: openai
    credential:
      mode: replace_client
      header: authorization
      format: "Bearer {secret}"
      secret: {env: SERVER}
  - name: reject
    prefix: /reject
    upstream: https://api.anthropic.com
    credential: {mode: reject_client, header: x-api-key, secret: {env: SERVER}}
  - name: own
    prefix: /own
    upstream: https://api.anthropic.com
    access: false
    credential: {mode: client_only, header: x-api-key, client_credentials: [x-api-key, x-goog-api-key]}
  - name: keyless
    prefix: /keyless
    upstream: https://api.openai.com
    error_style: openai
    access: false
    credential: {header: x-api-key, secret: {env: ABSENT, optional: true}}
  - name: plain
    prefix: /plain
    upstream: https://example.com
  - name: bare
    prefix: /bare
    upstream: https://example.com
    access: false
"""
SERVER = b"sk-server-strength"
CLIENT_KEYS = {"alice": "gk-alice", "bob": "gk-bob"}


@dataclass(frozen=True)
class Gateway:
    policy: Policy
    config: GatewayConfig
    envoy: dict[str, str]  # YAML route name → Envoy route name

    def ask(self, route: str, headers: Headers, admission: Admission | None = None) -> Answer:
        return process(
            self.policy, headers_request(self.envoy.get(route, route), headers), admission
        )

    def route(self, name: str) -> CompiledRoute:
        return self.policy.routes[self.envoy[name]]


def write_gateway(folder: Path, text: str = CONFIG) -> GatewayConfig:
    (folder / "keys.txt").write_text("".join(key_line(n, k) + "\n" for n, k in CLIENT_KEYS.items()))
    (folder / "gateway.yaml").write_text(text)
    return load_config(folder / "gateway.yaml")


def compiled_anew(folder: Path) -> Gateway:
    config = write_gateway(folder)
    policy = compile_policy(config, {"SERVER": SERVER.decode()})
    return Gateway(policy, config, {r.name: r.envoy_name for r in config.routes})


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    """Compiled for each test: mutmut picks the tests to run by what each one calls."""
    return compiled_anew(tmp_path)


def parsed(answer: Answer) -> pb.ProcessingResponse:
    return pb.ProcessingResponse.FromString(answer.payload)


def metadata(reply: pb.ProcessingResponse) -> dict[str, str]:
    fields = reply.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    return {name: value.string_value for name, value in fields.items()}


def mutation(reply: pb.ProcessingResponse) -> tuple[list[tuple[str, bytes]], list[str]]:
    """What the answer sets and removes (empty when it passes the request through)."""
    found = reply.request_headers.response.header_mutation
    return [(o.header.key, o.header.raw_value) for o in found.set_headers], list(
        found.remove_headers
    )


OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
GK_ALICE = ("x-api-key", b"gk-alice")
GK_BEARER = ("authorization", b"Bearer gk-alice")
SET_KEY = [("x-api-key", SERVER)]
SET_BEARER = [("authorization", b"Bearer " + SERVER)]
DENIED_WITH_KEYS = ("Missing or invalid gateway key: send yours as x-api-key, as "
                    "'Authorization: Bearer <key>' or in the {} header.")  # fmt: skip
NO_KEY = DENIED_WITH_KEYS.replace("Missing or invalid gateway key", "No gateway key")


class Passing(NamedTuple):
    sentence: str
    route: str
    headers: Headers
    outcome: Outcome
    client: str
    sets: list[tuple[str, bytes]]  # headers set, with their values
    removes: list[str]


PASSING = [
    Passing("keyed: a gateway key as x-api-key is overwritten by the server key, named",
     "keyed", [GK_ALICE], Outcome.INJECTED, "alice", SET_KEY, []),
    Passing("keyed: a gateway key only in the access header is enough",
     "keyed", [("x-gateway-key", b"gk-bob")], Outcome.INJECTED, "bob", SET_KEY, []),
    Passing("keyed: a gateway key as Bearer and a placeholder x-api-key: Bearer removed",
     "keyed", [GK_BEARER, ("x-api-key", b"dummy")], Outcome.INJECTED, "alice", SET_KEY, ["authorization"]),
    Passing("keyed: OAuth and a gateway key in x-api-key: only the key is removed, nothing set",
     "keyed", [OAUTH, GK_ALICE], Outcome.CLIENT_AUTHORIZATION, "alice", [], ["x-api-key"]),
    Passing("keyed: own key and no gateway key: passed through untouched",
     "keyed", [OWN_KEY], Outcome.CLIENT_API_KEY, "", [], []),
    Passing("strict: own key and the key in its own access header: passed, named",
     "strict", [OWN_KEY, ("x-team-key", b"gk-alice")], Outcome.CLIENT_API_KEY, "alice", [], []),
    Passing("open: a placeholder is blank: the server key is set over it",
     "open", [("x-api-key", b"dummy")], Outcome.INJECTED, "", SET_KEY, []),
    Passing("open: a placeholder Bearer is removed beside the injected key",
     "open", [("authorization", b"Bearer dummy")], Outcome.INJECTED, "", SET_KEY, ["authorization"]),
    Passing("replace: OAuth is overwritten by the server's Bearer, x-api-key own key removed, named",
     "replace", [OAUTH, OWN_KEY, ("x-gateway-key", b"gk-alice")], Outcome.REPLACED, "alice", SET_BEARER, ["x-api-key"]),
    Passing("replace: a Bearer gateway key is overwritten, named",
     "replace", [GK_BEARER], Outcome.INJECTED, "alice", SET_BEARER, []),
    Passing("own: the client's key in its second credential header passes",
     "own", [("x-goog-api-key", b"AIza-own")], Outcome.CLIENT_API_KEY, "", [], []),
    Passing("plain: a gateway key as x-api-key is removed and the request forwarded, named",
     "plain", [GK_ALICE], Outcome.FORWARDED, "alice", [], ["x-api-key"]),
    Passing("plain: keys in both slots are both removed",
     "plain", [GK_ALICE, GK_BEARER], Outcome.FORWARDED, "alice", [], ["authorization", "x-api-key"]),
    Passing("plain: no key at all: forwarded untouched",
     "plain", [("accept", b"*/*")], Outcome.FORWARDED, "", [], []),
    Passing("plain: own key beside a gateway key: the client pays, the key is removed",
     "plain", [OAUTH, GK_ALICE], Outcome.CLIENT_AUTHORIZATION, "alice", [], ["x-api-key"]),
]  # fmt: skip


@pytest.mark.parametrize("case", PASSING, ids=[c.sentence for c in PASSING])
def test_each_route_kind_answers_with_its_mutation_and_metadata(
    gateway: Gateway, case: Passing
) -> None:
    answer = gateway.ask(case.route, case.headers)
    assert answer == Answer(answer.payload, case.route, case.outcome, case.client)
    reply = parsed(answer)
    assert reply.WhichOneof("response") == "request_headers"
    assert mutation(reply) == (case.sets, case.removes)
    expected = {"route": case.route, "credential_source": case.outcome.credential_source,
                "outcome": case.outcome.value}  # fmt: skip
    assert metadata(reply) == expected | ({"client": case.client} if case.client else {})


class Refusing(NamedTuple):
    sentence: str
    route: str
    headers: Headers
    outcome: Outcome
    client: str
    shape: ErrorStyle
    message: str


REFUSING = [
    Refusing("keyed: nothing sent: no_credential, in Anthropic's shape, naming the access header",
     "keyed", [("accept", b"*/*")], Outcome.NO_CREDENTIAL, "", ErrorStyle.ANTHROPIC, NO_KEY.format("x-gateway-key")),
    Refusing("strict: own key without a gateway key: denied, naming the route's own access header",
     "strict", [OWN_KEY], Outcome.DENIED, "", ErrorStyle.ANTHROPIC, DENIED_WITH_KEYS.format("x-team-key")),
    Refusing("open: a gateway key on a route without keys: denied, keys not accepted here",
     "open", [GK_ALICE], Outcome.DENIED, "", ErrorStyle.ANTHROPIC, "Gateway keys are not accepted on route 'open'."),
    Refusing("bare: a gateway key on a forward-only route without keys: denied",
     "bare", [GK_BEARER], Outcome.DENIED, "", ErrorStyle.ANTHROPIC, "Gateway keys are not accepted on route 'bare'."),
    Refusing("plain: an invalid gateway key on a forward-only route: denied",
     "plain", [("x-api-key", b"gk-typo")], Outcome.DENIED, "", ErrorStyle.ANTHROPIC, DENIED_WITH_KEYS.format("x-gateway-key")),
    Refusing("replace: OAuth without a gateway key: denied, in OpenAI's shape",
     "replace", [OAUTH], Outcome.DENIED, "", ErrorStyle.OPENAI, DENIED_WITH_KEYS.format("x-gateway-key")),
    Refusing("reject: own key beside a valid gateway key: refused, named, listing the credential headers",
     "reject", [OWN_KEY, GK_BEARER], Outcome.REFUSED, "alice", ErrorStyle.ANTHROPIC,
     "Route 'reject' uses the organisation's key: send no credential of your own "
     "(authorization or x-api-key), only your gateway key if you have one."),
    Refusing("own: nothing sent: rejected, asking for the client's own credential",
     "own", [], Outcome.REJECTED, "", ErrorStyle.ANTHROPIC,
     "Route 'own' takes only your own credential: send it (x-api-key or x-goog-api-key)."),
    Refusing("keyless: nothing sent and no server key: rejected, in OpenAI's shape",
     "keyless", [("x-api-key", b" ")], Outcome.REJECTED, "", ErrorStyle.OPENAI,
     "No credential: this gateway has no server key for route 'keyless'. "
     "Send your own (authorization or x-api-key)."),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSING, ids=[c.sentence for c in REFUSING])
def test_each_refusal_is_a_401_in_the_routes_shape_with_its_message(
    gateway: Gateway, case: Refusing
) -> None:
    answer = gateway.ask(case.route, case.headers)
    assert answer == Answer(answer.payload, case.route, case.outcome, case.client)
    reply = parsed(answer).immediate_response
    assert (reply.status.code, reply.details) == (401, f"credential_gateway_{case.outcome.value}")
    assert not reply.headers.set_headers
    if case.shape is ErrorStyle.OPENAI:
        error = {"message": case.message, "type": "invalid_request_error", "param": None,
                 "code": "invalid_api_key"}  # fmt: skip
        assert json.loads(reply.body) == {"error": error}
    else:
        error = {"type": "authentication_error", "message": case.message}
        assert json.loads(reply.body) == {"type": "error", "error": error}
    expected = {"route": case.route, "credential_source": "none", "outcome": case.outcome.value}
    assert metadata(parsed(answer)) == expected | ({"client": case.client} if case.client else {})


# -- answers are built once per route and rebuilt when what they say changes -----------------


def test_a_routes_common_answers_are_built_at_compile_and_never_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = compiled_anew(tmp_path).route("keyed").answers
    assert answers.count == 5  # client pays (either header), denied, no credential, injected
    built: list[tuple[Outcome, tuple[str, ...]]] = []
    build = answers._build

    def counted(outcome: Outcome, remove: tuple[str, ...]) -> bytes:
        built.append((outcome, remove))
        return build(outcome, remove)

    monkeypatch.setattr(answers, "_build", counted)
    for outcome in (Outcome.CLIENT_AUTHORIZATION, Outcome.CLIENT_API_KEY, Outcome.DENIED, Outcome.NO_CREDENTIAL,
                    Outcome.INJECTED):  # fmt: skip
        assert answers.answer(outcome, (), "alice") == answers.answer(outcome, (), "alice")
    assert built == []
    first = answers.answer(Outcome.INJECTED, ("authorization",), "bob")
    assert answers.answer(Outcome.INJECTED, ("authorization",), "bob") == first
    assert built == [(Outcome.INJECTED, ("authorization",))]


def test_a_route_without_a_server_key_prebuilds_its_rejection(tmp_path: Path) -> None:
    answers = compiled_anew(tmp_path).route("keyless").answers
    assert answers.count == 5
    answers.answer(Outcome.REJECTED, (), "")
    assert answers.count == 5


CHANGES = [
    ("the access header alone", "header: x-team-key", "header: x-other-key", "x-other-key"),
    ("the error style alone", "error_style: openai", "error_style: anthropic", "x-team-key"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "header"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES]
)
def test_a_change_to_what_a_denial_says_rebuilds_the_answers(
    tmp_path: Path, old: str, new: str, header: str
) -> None:
    text = ("listener: {address: 127.0.0.1, port: 4000}\nroutes:\n  - name: a\n    prefix: /a\n"
            "    upstream: https://api.openai.com\n    error_style: openai\n"
            "    access: {keys_file: keys.txt, header: x-team-key}\n"
            "    credential: {header: x-api-key, secret: {env: SERVER}}\n")  # fmt: skip
    before = compile_policy(write_gateway(tmp_path, text), {"SERVER": "s"})
    config = write_gateway(tmp_path, text.replace(old, new))
    after = compile_policy(config, {"SERVER": "s"}, before)
    [name] = after.routes
    assert name in before.routes  # same Envoy route: only the answers can change
    assert after.routes[name].answers is not before.routes[name].answers
    reply = pb.ProcessingResponse.FromString(after.routes[name].answer(Outcome.DENIED, (), ""))
    body = json.loads(reply.immediate_response.body)
    assert ("type" in body) == ("anthropic" in new)
    message = body["error"]["message"]
    assert message == DENIED_WITH_KEYS.format(header)


def test_every_unusable_secret_and_keys_file_is_reported_at_once(tmp_path: Path) -> None:
    text = ("listener: {address: 127.0.0.1, port: 4000}\nroutes:\n"
            "  - {name: a, prefix: /a, upstream: 'https://x.example', access: {keys_file: none-a},\n"
            "     credential: {header: x-api-key, secret: {env: UNSET_A}}}\n"
            "  - {name: b, prefix: /b, upstream: 'https://x.example', access: {keys_file: none-b},\n"
            "     credential: {header: x-api-key, secret: {env: SERVER}}}\n"
            "  - {name: c, prefix: /c, upstream: 'https://x.example', access: {keys_file: none-c}}\n"
            "  - {name: d, prefix: /d, upstream: 'https://x.example', access: false,\n"
            "     credential: {header: x-api-key, secret: {env: UNSET_D}}}\n")  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        compile_policy(write_gateway(tmp_path, text), {"SERVER": "s"})
    assert caught.value.problems == (
        "gateway.yaml:4 routes[0].credential.secret: environment variable UNSET_A is not set",
        f"gateway.yaml:5 routes[1].access: keys file {tmp_path}/none-b cannot be read: No such file or directory",
        f"gateway.yaml:7 routes[2].access: keys file {tmp_path}/none-c cannot be read: No such file or directory",
        "gateway.yaml:9 routes[3].credential.secret: environment variable UNSET_D is not set",
    )


def test_only_routes_that_spend_a_missing_optional_key_are_listed_missing(gateway: Gateway) -> None:
    assert gateway.policy.missing_optional == ("keyless",)


def test_the_limits_are_compiled_into_the_policy(gateway: Gateway, tmp_path: Path) -> None:
    assert gateway.policy.limits == LimitTable.of(gateway.config.limits)
    assert gateway.policy.limits.for_client("alice") == Limit(requests_per_minute=10)
    [limits] = [line for line in CONFIG.splitlines(keepends=True) if line.startswith("limits:")]
    without = write_gateway(tmp_path, CONFIG.replace(limits, ""))
    assert compile_policy(without, {"SERVER": "s"}).limits is None


# -- limits on the organisation's key, as the processor asks them --------------------------


class Recorder:
    """An Admission that answers ``refusal`` and remembers what it was asked."""

    def __init__(self, refusal: Refusal | None = None) -> None:
        self.refusal = refusal
        self.asked: list[tuple[str, Limit, StoreFailure]] = []

    def admit(
        self, client: str, limit: Limit, on_store_error: StoreFailure, *budgets: object
    ) -> Refusal | None:  # (no budgets in these tests)
        self.asked.append((client, limit, on_store_error))
        return self.refusal


OVER = Refusal(429, "requests_per_minute", 17, "Too many requests: 10 per minute.")
ALICE_ASKED = [("alice", Limit(requests_per_minute=10), StoreFailure.CLOSED)]


class Admitting(NamedTuple):
    sentence: str
    route: str
    headers: Headers
    refusal: Refusal | None  # what the admission would answer, if asked
    outcome: Outcome
    client: str
    asked: list[tuple[str, Limit, StoreFailure]]


ADMISSION = [
    Admitting("a named client within its limit on the organisation's key: injected, asked once",
     "keyed", [GK_ALICE], None, Outcome.INJECTED, "alice", ALICE_ASKED),
    Admitting("a named client whose key replaces the client's: replaced, asked once",
     "replace", [OAUTH, GK_ALICE], None, Outcome.REPLACED, "alice", ALICE_ASKED),
    Admitting("a named client paying with its own credential: not asked",
     "keyed", [OAUTH, GK_ALICE], OVER, Outcome.CLIENT_AUTHORIZATION, "alice", []),
    Admitting("a named client on a forward-only route: not asked",
     "plain", [GK_ALICE], OVER, Outcome.FORWARDED, "alice", []),
    Admitting("a client with no limit configured: not asked",
     "keyed", [("x-api-key", b"gk-bob")], OVER, Outcome.INJECTED, "bob", []),
    Admitting("nobody named (a route without keys): not asked",
     "open", [], OVER, Outcome.INJECTED, "", []),
    Admitting("a request with no key: not asked",
     "keyed", [], OVER, Outcome.NO_CREDENTIAL, "", []),
]  # fmt: skip


@pytest.mark.parametrize("case", ADMISSION, ids=[c.sentence for c in ADMISSION])
def test_only_a_named_client_spending_the_organisations_key_is_asked_about_its_limits(
    gateway: Gateway, case: Admitting
) -> None:
    admission = Recorder(case.refusal)
    answer = gateway.ask(case.route, case.headers, admission)
    assert answer == gateway.ask(case.route, case.headers)  # the same bytes as unlimited
    assert (answer.outcome, answer.client) == (case.outcome, case.client)
    assert admission.asked == case.asked


LIMITED = [
    ("over a limit on an Anthropic route: 429 in Anthropic's shape",
     "keyed", [GK_ALICE], OVER, {"type": "error", "error": {"type": "rate_limit_error", "message": OVER.message}}),
    ("limits unavailable on an OpenAI route: 503 in OpenAI's shape",
     "replace", [GK_BEARER], Refusal(503, "store", 1, "Limits cannot be checked."),
     {"error": {"message": "Limits cannot be checked.", "type": "server_error", "param": None, "code": "service_unavailable"}}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "headers", "refusal", "body"), [c[1:] for c in LIMITED], ids=[c[0] for c in LIMITED]
)
def test_a_refused_client_gets_the_refusal_with_retry_after_and_its_name(
    gateway: Gateway, route: str, headers: Headers, refusal: Refusal, body: dict[str, object]
) -> None:
    admission = Recorder(refusal)
    answer = gateway.ask(route, headers, admission)
    assert answer == Answer(answer.payload, route, Outcome.LIMITED, "alice")
    assert admission.asked == ALICE_ASKED
    reply = parsed(answer)
    immediate = reply.immediate_response
    assert (immediate.status.code, immediate.details) == (
        refusal.status,
        f"credential_gateway_limited_{refusal.limit}",
    )
    [option] = immediate.headers.set_headers
    assert (option.header.key, option.header.raw_value, option.append_action) == (
        "retry-after",
        str(refusal.retry_after).encode(),
        OVERWRITE,
    )
    assert json.loads(immediate.body) == body
    assert metadata(reply) == {"route": route, "credential_source": "none", "outcome": "limited",
                               "client": "alice"}  # fmt: skip
    assert SERVER not in answer.payload


def test_without_an_admission_or_limits_nothing_is_asked(gateway: Gateway) -> None:
    request = headers_request(gateway.envoy["keyed"], [GK_ALICE])
    assert process(gateway.policy, request, None).outcome is Outcome.INJECTED
    admission = Recorder(OVER)
    unlimited = replace(gateway.policy, limits=None)
    assert process(unlimited, request, admission).outcome is Outcome.INJECTED
    assert admission.asked == []


# -- the processor's other answers ---------------------------------------------------------

PHASES = [
    "response_headers",
    "request_body",
    "response_body",
    "request_trailers",
    "response_trailers",
]


@pytest.mark.parametrize("phase", PHASES)
def test_a_later_phase_is_answered_in_kind_and_the_stream_stays_open(
    gateway: Gateway, phase: str
) -> None:
    message = pb.ProcessingRequest(**{phase: {}})
    assert process(gateway.policy, message) == Answer(PHASE_REPLIES[phase], "", None, "", False)


def test_no_matched_route_is_left_to_envoy_and_ends_the_stream(gateway: Gateway) -> None:
    answer = gateway.ask("", [GK_ALICE])
    assert answer == Answer(answer.payload, "", None, "", True)
    assert parsed(answer) == pb.ProcessingResponse(request_headers=pb.HeadersResponse())


def test_an_unknown_route_is_a_503_that_names_what_envoy_sent(gateway: Gateway) -> None:
    answer = gateway.ask("keyed-00000000", [GK_ALICE])
    assert answer == Answer(responses.unknown_route(), "keyed-00000000", Outcome.UNKNOWN_ROUTE)
    reply = parsed(answer)
    assert (reply.immediate_response.status.code, reply.immediate_response.details) == (
        503,
        "credential_gateway_unknown_route",
    )
    error = json.loads(reply.immediate_response.body)["error"]  # no route: both SDKs' fields
    assert (error["type"], error["code"]) == ("overloaded_error", "service_unavailable")
    assert "retry" in error["message"]
    assert metadata(reply) == {"route": "", "credential_source": "none", "outcome": "unknown_route"}


def test_a_message_with_no_phase_is_refused_with_a_reason(gateway: Gateway) -> None:
    with pytest.raises(MalformedRequest) as caught:
        process(gateway.policy, pb.ProcessingRequest())
    assert str(caught.value) == "ProcessingRequest has no phase set"


# -- the answer bytes ----------------------------------------------------------------------


@pytest.mark.parametrize("outcome", list(Outcome))
def test_appended_metadata_is_exactly_as_long_as_protobufs_own_encoding(outcome: Outcome) -> None:
    """Lengths around 127/128 at every nesting level: a varint off by one shows here."""
    for size in range(80, 300):
        route, client = "r" * size, "c" * (size // 2)
        appended = responses.with_metadata(b"", responses.metadata_fields(route, outcome), client)
        fields = {"route": route, "credential_source": outcome.credential_source,
                  "outcome": outcome.value, "client": client}  # fmt: skip
        slow = pb.ProcessingResponse()
        slow.dynamic_metadata.update({METADATA_NAMESPACE: fields})
        assert len(appended) == slow.ByteSize(), size
        assert pb.ProcessingResponse.FromString(appended) == slow, size


# (sentence, style, body)
ERROR_BODIES = [
    ("Anthropic: type error with the kind and the message",
     ErrorStyle.ANTHROPIC, {"type": "error", "error": {"type": "authentication_error", "message": "m"}}),
    ("OpenAI: the message, the kind as type, no param, the code",
     ErrorStyle.OPENAI, {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("style", "body"), [c[1:] for c in ERROR_BODIES], ids=[c[0] for c in ERROR_BODIES]
)
def test_a_rejection_body_has_the_providers_shape(style: ErrorStyle, body: object) -> None:
    assert json.loads(responses.error_body(style, "m")) == body
    reply = pb.ProcessingResponse.FromString(responses.reject(Outcome.REFUSED, style, "m"))
    assert json.loads(reply.immediate_response.body) == body
    assert reply.immediate_response.details == "credential_gateway_refused"


# -- the rendered route table agrees with the decision -------------------------------------
#
# Envoy picks the first route whose path and header matchers all match; header values are
# joined with ',' when repeated, a missing header is "" only with
# treat_missing_header_as_empty (otherwise the matcher fails), invert_match flips the
# result, and safe_regex is RE2, matched in full. RE2's \s is [\t\n\f\r ]; with re.ASCII
# Python's adds only \v, which Envoy never lets into a header value (nor any other control
# character but tab), so the values below use tab, printable ASCII and UTF-8.

ROUTES_CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
access: {keys_file: keys.txt}
placeholders: [dummy, EMPTY]
routes:
  - {name: prefer, prefix: /prefer, upstream: 'https://api.anthropic.com',
     credential: {header: x-api-key, secret: {env: SERVER}}}
  - {name: open, prefix: /open, upstream: 'https://api.anthropic.com', access: false,
     credential: {header: x-api-key, secret: {env: SERVER}, placeholders: []}}
  - {name: google, prefix: /google, upstream: 'https://generativelanguage.googleapis.com', access: false,
     credential: {header: x-goog-api-key, secret: {env: SERVER}, client_credentials: [x-goog-api-key, authorization]}}
  - {name: bearer, prefix: /bearer, upstream: 'https://api.openai.com/v1',
     credential: {header: authorization, format: 'Bearer {secret}', secret: {env: SERVER}, client_credentials: [authorization]}}
  - {name: strict, prefix: /strict, upstream: 'https://api.anthropic.com',
     access: {keys_file: keys.txt, header: x-team-key, for_client_credentials: true},
     credential: {header: x-api-key, secret: {env: SERVER}}}
  - {name: replace, prefix: /replace, upstream: 'https://api.openai.com',
     credential: {mode: replace_client, header: x-api-key, secret: {env: SERVER}}}
  - {name: reject, prefix: /reject, upstream: 'https://api.anthropic.com',
     credential: {mode: reject_client, header: x-api-key, secret: {env: SERVER}}}
  - {name: own, prefix: /own, upstream: 'https://api.anthropic.com', access: false,
     credential: {mode: client_only, header: x-api-key}}
  - {name: keyless, prefix: /keyless, upstream: 'https://api.anthropic.com', access: false,
     credential: {header: x-api-key, secret: {env: ABSENT, optional: true}}}
  - {name: plain, prefix: /plain, upstream: 'https://example.com'}
  - {name: bare, prefix: /bare, upstream: 'https://example.com', access: false}
"""
CREDENTIAL_ROUTES = [
    "prefer",
    "open",
    "google",
    "bearer",
    "strict",
    "replace",
    "reject",
    "own",
    "keyless",
]
FORWARD_ROUTES = ["plain", "bare"]
PASSES = (Outcome.CLIENT_AUTHORIZATION, Outcome.CLIENT_API_KEY)
HEADER_VALUES = [
    "", " ", "\t", "own", " own ", "Bearer", "Bearer ", "bearer own", "Basic  x", "Bearer\town",
    "Bearer ,", ",", "own,", ",own", " , ", "dummy", "EMPTY", "Bearer dummy", " dummy ", "dummy,own",
    "dummyx", "gk-alice", "Bearer gk-alice", " gk-alice", "gk-typo", "Bearer\tgk-alice",
    "x,gk-alice", "sk-gk-1", "GK-alice", "é", "Bearer é",
]  # fmt: skip
FEW_VALUES = ["", "Bearer ", "own", "Bearer own", "dummy", "gk-alice", "Bearer gk-alice", ","]
NAMES = ["authorization", "x-api-key", "x-goog-api-key", "x-gateway-key", "x-team-key"]


@dataclass(frozen=True)
class Rendered:
    table: dict[str, Any]
    policy: Policy


def rendered(folder: Path, text: str = ROUTES_CONFIG) -> Rendered:
    config = write_gateway(folder, text)
    return Rendered(route_config(config), compile_policy(config, {"SERVER": "sk-server"}))


@pytest.fixture
def table(tmp_path: Path) -> Rendered:
    """Rendered for each test: mutmut picks the tests to run by what each one calls."""
    return rendered(tmp_path)


def header_matches(matcher: dict[str, Any], joined: dict[str, str]) -> bool:
    value = joined.get(matcher["name"])
    if value is None:
        if not matcher.get("treat_missing_header_as_empty", False):
            return False
        value = ""
    spec = matcher["string_match"]
    if "exact" in spec:
        hit = value == spec["exact"]
    elif "contains" in spec:
        hit = spec["contains"] in value
    else:
        hit = re.fullmatch(spec["safe_regex"]["regex"], value, re.ASCII) is not None
    return hit != matcher.get("invert_match", False)


def path_matches(match: dict[str, Any], path: str) -> bool:
    path = path.split("?", 1)[0]
    if "prefix" in match:
        return path.startswith(match["prefix"])
    segment = match["path_separated_prefix"]
    return path == segment or path.startswith(segment + "/")


def envoy_route(
    table: dict[str, Any], path: str, headers: Headers, method: str = "POST"
) -> dict[str, Any]:
    """The route Envoy picks for this request."""
    joined: dict[str, list[str]] = {":method": [method]}
    for name, value in headers:
        joined.setdefault(name.lower(), []).append(value.decode())
    values = {name: ",".join(found) for name, found in joined.items()}
    [host] = table["virtual_hosts"]
    for route in host["routes"]:
        match = route["match"]
        if path_matches(match, path) and all(
            header_matches(m, values) for m in match.get("headers", [])
        ):
            return route
    raise AssertionError(f"no route for {path}")


def asks_processor(route: dict[str, Any]) -> bool:
    return EXTPROC_FILTER not in route.get("typed_per_filter_config", {})


def header_sets(names: list[str]) -> list[list[tuple[str, bytes]]]:
    """Every value in each header alone, every pair of few values in two headers or one twice."""
    sets = [[(name, value.encode())] for name in names for value in HEADER_VALUES]
    for first, second in itertools.combinations_with_replacement(names, 2):
        for a, b in itertools.product(FEW_VALUES, repeat=2):
            sets.append([(first, a.encode()), (second.upper(), b.encode())])
    return sets


@pytest.mark.parametrize("name", CREDENTIAL_ROUTES + FORWARD_ROUTES)
def test_a_request_envoy_lets_past_the_processor_is_one_the_processor_would_pass_untouched(
    table: Rendered, name: str
) -> None:
    envoy_name = next(n for n, r in table.policy.routes.items() if r.name == name)
    rule = table.policy.routes[envoy_name].rule
    for headers in header_sets(NAMES):
        route = envoy_route(table.table, f"/{name}/v1/messages", headers)
        assert route["name"] == envoy_name
        if asks_processor(route):
            continue
        decision = decide(rule, headers)
        allowed = PASSES + ((Outcome.FORWARDED,) if rule.forward_only else ())
        assert decision.outcome in allowed and decision.remove == (), (headers, decision)


# (sentence, route, headers, the processor is asked)
FAST_PATH = [
    ("prefer: an own x-api-key skips the processor", "prefer", [OWN_KEY], False),
    ("prefer: an OAuth token skips the processor", "prefer", [OAUTH], False),
    ("prefer: no credential asks the processor", "prefer", [], True),
    ("prefer: a placeholder from the top level asks the processor", "prefer", [("x-api-key", b"EMPTY")], True),
    ("open: its own empty placeholder list makes dummy a key", "open", [("x-api-key", b"dummy")], False),
    ("google: its own header skips the processor", "google", [("x-goog-api-key", b"AIza-own")], False),
    ("google: x-api-key is not its credential header", "google", [OWN_KEY], True),
    ("bearer: an own token skips the processor", "bearer", [("authorization", b"Bearer sk-own")], False),
    ("strict: even an own key asks the processor", "strict", [OWN_KEY], True),
    ("replace: an own key asks the processor", "replace", [OAUTH], True),
    ("reject: an own key asks the processor", "reject", [OWN_KEY], True),
    ("own: an own key skips the processor", "own", [OWN_KEY], False),
    ("keyless: an own key skips the processor", "keyless", [OWN_KEY], False),
    ("plain: nothing skips the processor", "plain", [], False),
    ("plain: an own key skips the processor", "plain", [OAUTH], False),
    ("plain: a gateway key as Bearer asks the processor", "plain", [GK_BEARER], True),
    ("plain: a gateway key as x-api-key asks the processor", "plain", [GK_ALICE], True),
    ("bare: a gateway key asks the processor", "bare", [("x-api-key", b" gk-typo")], True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "headers", "asked"), [c[1:] for c in FAST_PATH], ids=[c[0] for c in FAST_PATH]
)
def test_the_fast_path_is_taken_where_it_may_be(
    table: Rendered, name: str, headers: Headers, asked: bool
) -> None:
    route = envoy_route(table.table, f"/{name}/x", headers)
    assert route["name"].startswith(name + "-")
    assert asks_processor(route) is asked
    # A route without a credential spends no key of ours: nothing there is metered.
    metering_off = METERING_FILTER in route.get("typed_per_filter_config", {})
    assert metering_off == (name in FORWARD_ROUTES)
    if not asked and name not in FORWARD_ROUTES:  # the client pays, and Envoy says so itself
        credential = route["metadata"]["filter_metadata"][METADATA_NAMESPACE]
        assert credential == {"credential_source": "client"}


def test_without_the_fast_path_every_credential_request_asks_the_processor(tmp_path: Path) -> None:
    table = rendered(
        tmp_path, ROUTES_CONFIG.replace("routes:", "extproc: {fast_path: false}\nroutes:", 1)
    )
    for name in CREDENTIAL_ROUTES:
        for headers in ([OWN_KEY], [OAUTH], [("x-goog-api-key", b"AIza-own")]):
            assert asks_processor(envoy_route(table.table, f"/{name}", headers)), (name, headers)


def test_every_access_header_is_stripped_on_every_route(table: Rendered, tmp_path: Path) -> None:
    assert table.table["request_headers_to_remove"] == ["x-gateway-key", "x-team-key"]
    no_keys = "\n".join(line for line in ROUTES_CONFIG.splitlines() if "keys.txt" not in line)
    open_table = rendered(tmp_path, no_keys.replace("access: {keys_file: keys.txt}", "") + "\n")
    assert "request_headers_to_remove" not in open_table.table


class PathCase(NamedTuple):
    sentence: str
    prefix: str
    upstream: str
    path: str
    route: str | None  # None: the 404 route
    rewritten: str | None  # the path the upstream sees


PATHS = [
    PathCase("the prefix itself", "/anthropic", "https://a.example", "/anthropic", "a", "/"),
    PathCase("under the prefix", "/anthropic", "https://a.example", "/anthropic/v1/messages", "a", "/v1/messages"),
    PathCase("a longer segment is another path", "/anthropic", "https://a.example", "/anthropicx/v1", None, None),
    PathCase("the upstream's path replaces the prefix", "/openai", "https://o.example/v1", "/openai/chat?x=1", "a", "/v1/chat"),
    PathCase("a prefix ending in X is kept whole", "/modelX", "https://a.example", "/modelX/v1", "a", "/v1"),
    PathCase("dots, tildes, underscores and dashes are literal", "/v1.0~a_b-c", "https://a.example", "/v1.0~a_b-c/m", "a", "/m"),
    PathCase("a dot in the prefix matches only a dot", "/v1.0", "https://a.example", "/v1x0/m", None, None),
    PathCase("the root prefix takes every path", "/", "https://a.example/base", "/v1/messages", "a", "/base/v1/messages"),
    PathCase("several segments", "/team/anthropic/", "https://a.example", "/team/anthropic/v1", "a", "/v1"),
]  # fmt: skip


@pytest.mark.parametrize("case", PATHS, ids=[c.sentence for c in PATHS])
def test_a_prefix_matches_whole_segments_and_is_replaced_by_the_upstream_path(
    tmp_path: Path, case: PathCase
) -> None:
    text = (f"listener: {{address: 127.0.0.1, port: 4000}}\nroutes:\n"
            f"  - {{name: a, prefix: '{case.prefix}', upstream: '{case.upstream}'}}\n")  # fmt: skip
    chosen = envoy_route(rendered(tmp_path, text).table, case.path, [])
    if case.route is None:
        assert chosen["name"] == "not_found"
        return
    assert chosen["name"].startswith(case.route + "-")
    action = chosen["route"]
    bare, rewritten = case.path.split("?", 1)[0], case.rewritten
    if "prefix_rewrite" in action:
        assert "prefix" in chosen["match"]
        assert action["prefix_rewrite"] + bare[len(chosen["match"]["prefix"]) :] == rewritten
    else:
        rewrite = action["regex_rewrite"]
        assert (
            re.sub(rewrite["pattern"]["regex"], rewrite["substitution"], bare, count=1) == rewritten
        )


class Local(NamedTuple):
    sentence: str
    method: str
    path: str
    status: int
    error: dict[str, str]
    code: str  # OpenAI's error.code


LOCAL = [
    Local("TRACE on a credential route is refused: the origin would echo the injected key",
          "TRACE", "/prefer/v1/messages", 405,
          {"type": "invalid_request_error", "message": "method TRACE is not allowed"}, "invalid_request"),
    Local("TRACE on a route without a credential is refused too", "TRACE", "/plain", 405,
          {"type": "invalid_request_error", "message": "method TRACE is not allowed"}, "invalid_request"),
    Local("a path under no prefix gets a 404 from Envoy", "POST", "/nowhere/v1", 404,
          {"type": "not_found_error", "message": "no gateway route matches this path"}, "unknown_url"),
    Local("a longer first segment is under no prefix", "GET", "/preferx", 404,
          {"type": "not_found_error", "message": "no gateway route matches this path"}, "unknown_url"),
]  # fmt: skip


@pytest.mark.parametrize("case", LOCAL, ids=[c.sentence for c in LOCAL])
def test_envoy_answers_trace_and_unknown_paths_itself_in_json(table: Rendered, case: Local) -> None:
    [host] = table.table["virtual_hosts"]
    assert host["domains"] == ["*"]  # whatever Host the client sends
    assert host["name"] == "gateway"  # the README's /stats?filter=vhost.gateway
    route = envoy_route(table.table, case.path, [GK_ALICE, OAUTH], case.method)
    assert route["name"] == ("no_trace" if case.status == 405 else "not_found")  # access log
    reply = route["direct_response"]
    assert reply["status"] == case.status
    body = json.loads(reply["body"]["inline_string"])  # no route, so no provider: both SDKs' fields
    assert body == {"type": "error", "error": case.error | {"code": case.code}}
    content_type = {"header": {"key": "content-type", "value": "application/json"}}
    assert route["response_headers_to_add"] == [content_type]
    assert set(route["typed_per_filter_config"]) == {EXTPROC_FILTER, METERING_FILTER}


def test_the_route_table_has_the_name_the_listener_asks_for(
    table: Rendered, tmp_path: Path
) -> None:
    manager = connection_manager(write_gateway(tmp_path, ROUTES_CONFIG), {"path": "rds.yaml"})
    assert manager["rds"]["route_config_name"] == table.table["name"]


HOSTS = {"google": "generativelanguage.googleapis.com", "bearer": "api.openai.com",
         "replace": "api.openai.com", "plain": "example.com", "bare": "example.com"}  # fmt: skip


@pytest.mark.parametrize("name", CREDENTIAL_ROUTES + FORWARD_ROUTES)
def test_every_copy_of_a_route_goes_to_its_own_upstream_the_same_way(
    table: Rendered, name: str
) -> None:
    copies = [
        r for r in table.table["virtual_hosts"][0]["routes"] if r["name"].startswith(name + "-")
    ]
    assert len({r["name"] for r in copies}) == 1 and len(copies) >= 1
    actions = [copy["route"] for copy in copies]
    assert all(action == actions[0] for action in actions)
    action = actions[0]
    assert action["cluster"] == "route_" + copies[0]["name"]
    assert action["host_rewrite_literal"] == HOSTS.get(name, "api.anthropic.com")
    assert action["timeout"] == "0s"  # no overall limit: long SSE responses are never cut
    assert action["retry_policy"] == {
        "retry_on": "connect-failure,refused-stream,reset-before-request",
        "num_retries": 2,
    }


# -- malformed gateway keys never reach the upstream ------------------------------------------

# (sentence, headers)
LEAKS = [
    ("a valid key followed by a word in Authorization (the value starts with gk-)",
     [("authorization", b"gk-alice extra")]),
    ("a mistyped key followed by a word in Authorization",
     [("authorization", b"gk-typo x")]),
    ("a valid key after a tab instead of a space in Authorization",
     [("authorization", b"Bearer\tgk-alice")]),
    ("a valid key after a comma in one x-api-key value (the route table sends it to the processor as a key)",
     [("x-api-key", b"sk-own,gk-alice")]),
    ("a valid key after a comma in one Authorization value",
     [("authorization", b"Bearer sk-own, Bearer gk-alice")]),
]  # fmt: skip


@pytest.mark.parametrize("headers", [c[1] for c in LEAKS], ids=[c[0] for c in LEAKS])
def test_no_gateway_key_goes_upstream_untouched(headers: Headers) -> None:
    for route_rule in (rule(), rule(keys=None), rule(CLIENT_ONLY, secret=False)):
        decision = decide(route_rule, headers)
        passed = {name for name, _ in headers} - set(decision.remove)
        assert not (decision.outcome in PASSES and passed), (route_rule, decision)
