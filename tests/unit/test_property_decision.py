"""Properties of the decision and the processor over random header sets (hypothesis).

The oracle below restates the rule from the README independently of
``decide``: a ``gk-`` token in any credential slot, or any value in the access
header, is a presented gateway key; one in a slot, or a key being needed,
means all presented must be one valid key; the server key is set iff no client credential header
holds a token that is neither blank, a placeholder nor a gateway key, and
access was granted (no gateway keys on the route, or exactly one valid key, or
a client credential on a route that does not demand keys for them). Header
sets mix case variants, duplicates, blanks, bare schemes, placeholders, valid
and invalid gateway keys in every slot, and arbitrary bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness.keys import key_line
from harness.messages import header_map, headers_request
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config.load import load_config
from extproc.policy.access import GatewayKeys, Identity, KeyTable
from extproc.policy.compiled import Policy, compile_policy
from extproc.policy.decision import Decision, Outcome, RouteRule, decide, token_of
from extproc.policy.processor import process

KEY_HEADER = "x-gateway-key"
GATEWAY_KEYS = {"alice": b"gk-alice-property-key", "bob": b"gk-bob-property-key"}
ENTRIES = KeyTable(
    MappingProxyType(
        {hashlib.sha256(key).digest(): Identity(name) for name, key in GATEWAY_KEYS.items()}
    )
)
PLACEHOLDERS = frozenset({b"dummy", b"EMPTY"})
SERVER_KEY = b"sk-server-property-secret"
BEARER_KEY = b"sk-bearer-property-secret"
CREDENTIAL_NAMES = ("x-api-key", "authorization")
EXAMPLES = settings(max_examples=150, deadline=None)  # a few seconds in all

Headers = list[tuple[str, bytes]]

# -- strategies ---------------------------------------------------------------------------


def _case_variants(name: str) -> st.SearchStrategy[str]:
    flips = st.lists(st.booleans(), min_size=len(name), max_size=len(name))
    return flips.map(
        lambda up: "".join(c.upper() if u else c for c, u in zip(name, up, strict=True))
    )


_NAMES = st.one_of(
    st.sampled_from([*CREDENTIAL_NAMES, KEY_HEADER]).flatmap(_case_variants),
    st.sampled_from(["content-type", "host", "x-api-key-2", "authorizations", "x-gateway"]),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12),
)
_BLANKS = st.text(" \t\r\n\x0b\x0c", max_size=4).map(str.encode)
_VALUES = st.one_of(
    _BLANKS,
    st.sampled_from([b"Bearer", b"bearer ", b" BASIC\t", b"Bearer x", b"Token ", b",", b"\xa0"]),
    st.sampled_from([b"dummy", b"Bearer dummy", b" EMPTY ", b"empty", b"gk-", b"gk-nobody"]),
    st.sampled_from(list(GATEWAY_KEYS.values())).map(lambda key: key + b" extra"),
    st.sampled_from(list(GATEWAY_KEYS.values())).map(lambda key: b"Bearer\t" + key),
    st.sampled_from(list(GATEWAY_KEYS.values())).map(lambda key: b"sk-own," + key),
    st.sampled_from(list(GATEWAY_KEYS.values())).map(lambda key: b"x y " + key),
    st.sampled_from(list(GATEWAY_KEYS.values())),
    st.sampled_from(list(GATEWAY_KEYS.values())).map(lambda key: b"Bearer " + key),
    st.sampled_from(list(GATEWAY_KEYS.values())).map(lambda key: b" " + key + b"\t"),
    st.binary(max_size=24),
    st.tuples(st.sampled_from([b"Bearer ", b"Basic "]), st.binary(max_size=8)).map(b"".join),
)
HEADERS = st.lists(st.tuples(_NAMES, _VALUES), max_size=8)


@st.composite
def rules(draw: st.DrawFn) -> RouteRule:
    header = draw(st.sampled_from(CREDENTIAL_NAMES))
    others = draw(st.sets(st.sampled_from([*CREDENTIAL_NAMES, "x-other-key"])))
    keys = draw(
        st.one_of(
            st.none(),
            st.builds(GatewayKeys, st.just(KEY_HEADER), st.just(ENTRIES), st.booleans()),
        )
    )
    placeholders = draw(st.sampled_from([frozenset(), PLACEHOLDERS]))
    credentials = frozenset({header, *others})
    return RouteRule(header, credentials, draw(st.booleans()), keys, placeholders=placeholders)


# -- the oracle ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    client_credential: bool  # some client credential header is non-blank
    granted: bool
    inject: bool
    client: str  # the gateway key's name when a key was checked and valid


_FLAGGED = re.compile(rb"(?:^|,)\s*(?:\S+\s+)?gk-")  # as Envoy's route table flags a key
_WELL_FORMED = re.compile(rb"\s*(?:(?!gk-)\S+\s+)?(gk-\S*)\s*")


def _key_in(value: bytes) -> bytes | None:
    """The oracle's gateway key in a credential slot: None, or the key (b"" if malformed)."""
    if not _FLAGGED.search(value):
        return None
    whole = _WELL_FORMED.fullmatch(value)
    return whole.group(1) if whole and b"," not in value else b""


def _presented(rule: RouteRule, lowered: Sequence[tuple[str, bytes]]) -> list[bytes]:
    """Gateway keys: flagged values in any slot, and whatever is in the access header."""
    slots = {*rule.client_credentials, "authorization", "x-api-key"}
    key_header = rule.keys.header if rule.keys else None
    found = []
    for name, value in lowered:
        key = value.strip() if name == key_header else _key_in(value) if name in slots else None
        if key is not None:
            found.append(key)
    return found


def _own(rule: RouteRule, name: str, value: bytes) -> bool:
    """A client's own credential: in a credential header, not blank, placeholder or key."""
    token = token_of(name, value)
    if name not in rule.client_credentials or not token:
        return False
    key_header = rule.keys.header if rule.keys else None
    return name != key_header and token not in rule.placeholders and _key_in(value) is None


def expected(rule: RouteRule, headers: Sequence[tuple[str, bytes]]) -> Expected:
    lowered = [(name.lower(), value) for name, value in headers]
    client_credential = any(_own(rule, name, value) for name, value in lowered)
    presented = _presented(rule, lowered)
    client, granted = "", True
    needs_key = rule.keys is not None and (
        not client_credential or rule.keys.for_client_credentials
    )
    in_slots = len(presented) > sum(
        1 for name, _ in lowered if rule.keys and name == rule.keys.header
    )
    if in_slots or (needs_key and not rule.forward_only):
        distinct = set(presented)
        if rule.keys is not None and len(distinct) == 1:
            found = rule.keys.table.by_digest.get(hashlib.sha256(distinct.pop().strip()).digest())
            client = found.name if found else ""
        granted = bool(client)
    inject = granted and not client_credential and rule.has_secret and not rule.forward_only
    return Expected(client_credential, granted, inject, client)


# -- the decision -------------------------------------------------------------------------


@EXAMPLES
@given(rule=rules(), headers=HEADERS)
def test_decision_sets_the_key_iff_no_client_credential_and_access_granted(
    rule: RouteRule, headers: Headers
) -> None:
    decision = decide(rule, headers)
    want = expected(rule, headers)
    assert (decision.outcome is Outcome.INJECTED) == want.inject
    assert (decision.outcome in (Outcome.DENIED, Outcome.NO_CREDENTIAL)) == (not want.granted)
    if want.granted and not want.client_credential and not rule.has_secret:
        assert decision.outcome is Outcome.REJECTED
    if want.granted and want.client_credential:
        assert decision.outcome in (Outcome.CLIENT_API_KEY, Outcome.CLIENT_AUTHORIZATION)
    assert decision.client == want.client


@EXAMPLES
@given(rule=rules(), headers=HEADERS)
def test_decision_is_deterministic_and_removes_only_blank_client_credentials(
    rule: RouteRule, headers: Headers
) -> None:
    first = decide(rule, headers)
    assert decide(rule, list(headers)) == first
    assert decide(rule, iter(headers)) == first
    lowered = [(name.lower(), value) for name, value in headers]
    keyed = {
        name
        for name, value in lowered
        if name in {*rule.client_credentials, "authorization", "x-api-key"}
        and _key_in(value) is not None
    }
    unusable = {
        name
        for name, value in lowered
        if name in rule.client_credentials and not _own(rule, name, value)
    } - {rule.keys.header if rule.keys else ""}
    assert list(first.remove) == sorted(set(first.remove))
    if first.outcome is Outcome.INJECTED:
        assert set(first.remove) == (unusable | keyed) - {rule.header}
    elif first.outcome is Outcome.DENIED or first.outcome is Outcome.REJECTED:
        assert first.remove == ()
    else:
        assert set(first.remove) == keyed


@settings(max_examples=50, deadline=None)
@given(headers=HEADERS)
def test_decision_without_gateway_keys_denies_only_a_gateway_key(headers: Headers) -> None:
    rule = RouteRule("x-api-key", frozenset(CREDENTIAL_NAMES), True)
    keyed = any(
        name.lower() in CREDENTIAL_NAMES and _key_in(value) is not None for name, value in headers
    )
    assert (decide(rule, headers).outcome is Outcome.DENIED) == keyed


# -- the processor with real ProcessingRequest messages -------------------------------------

CONFIG = """\
listener: {address: 127.0.0.1, port: 4000}
access: {keys_file: keys.txt}
routes:
  - name: keyed
    prefix: /keyed/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: strict
    prefix: /strict/
    upstream: https://api.anthropic.com
    access: {keys_file: keys.txt, for_client_credentials: true}
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: open
    prefix: /open/
    upstream: https://api.anthropic.com
    access: false
    credential: {header: x-api-key, secret: {env: SERVER}}
  - name: bearer
    prefix: /bearer/
    upstream: https://api.openai.com/v1
    access: false
    credential:
      header: authorization
      format: "Bearer {secret}"
      secret: {env: BEARER}
      client_credentials: [authorization]
  - name: keyless
    prefix: /keyless/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: ABSENT, optional: true}}
  - {name: plain, prefix: /plain/, upstream: 'https://example.com'}
"""


@dataclass(frozen=True)
class Compiled:
    policy: Policy
    envoy_names: dict[str, str]  # YAML route name → Envoy route name
    values: dict[str, bytes]  # YAML route name → the header value it injects


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    folder = tmp_path_factory.mktemp("property")
    (folder / "keys.txt").write_text(
        "".join(key_line(name, key.decode()) + "\n" for name, key in GATEWAY_KEYS.items())
    )
    (folder / "gateway.yaml").write_text(CONFIG)
    config = load_config(folder / "gateway.yaml")
    policy = compile_policy(config, {"SERVER": SERVER_KEY.decode(), "BEARER": BEARER_KEY.decode()})
    names = {route.name: route.envoy_name for route in config.routes}
    values = {"bearer": b"Bearer " + BEARER_KEY}
    return Compiled(policy, names, values)


ROUTES = st.one_of(
    st.sampled_from(["keyed", "strict", "open", "bearer", "keyless", "plain"]),
    st.text(max_size=12).map(lambda text: "?" + text),  # a name Envoy would never send
)


def _rule(compiled: Compiled, route: str) -> RouteRule | None:
    found = compiled.policy.routes.get(compiled.envoy_names.get(route, route))
    return found.rule if found else None


@EXAMPLES
@given(route=ROUTES, headers=HEADERS)
def test_processor_answer_carries_the_key_iff_the_oracle_says_inject(
    compiled: Compiled, route: str, headers: Headers
) -> None:
    request = headers_request(compiled.envoy_names.get(route, route), headers)
    answer = process(compiled.policy, request)
    assert process(compiled.policy, request) == answer  # deterministic, byte for byte
    reply = pb.ProcessingResponse.FromString(answer.payload)
    rule = _rule(compiled, route)
    secret = compiled.values.get(route, SERVER_KEY)
    if rule is None:  # a route the policy does not know: fail closed, never a key
        assert answer.outcome is Outcome.UNKNOWN_ROUTE
        assert reply.immediate_response.status.code == 503
        assert SERVER_KEY not in answer.payload and BEARER_KEY not in answer.payload
        return
    want = expected(rule, headers)
    assert (secret in answer.payload) == want.inject
    assert (SERVER_KEY in answer.payload or BEARER_KEY in answer.payload) == want.inject
    slots = {*rule.client_credentials, "authorization", "x-api-key"}
    mutation = reply.request_headers.response.header_mutation
    if want.inject:
        [option] = mutation.set_headers
        assert (option.header.key, option.header.raw_value) == (rule.header, secret)
        assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        assert set(mutation.remove_headers) <= slots - {rule.header}
    else:
        assert not mutation.set_headers
        assert set(mutation.remove_headers) <= slots
    no_secret = not want.client_credential and not rule.has_secret and not rule.forward_only
    refused = not want.granted or no_secret
    assert reply.HasField("immediate_response") == refused
    if refused:
        assert reply.immediate_response.status.code == 401
    assert answer.client == want.client


LATER_PHASES = ("response_headers", "request_body", "response_body", "request_trailers",
                "response_trailers")  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(phase=st.sampled_from(LATER_PHASES), headers=HEADERS)
def test_processor_answers_any_later_phase_without_deciding(
    compiled: Compiled, phase: str, headers: Headers
) -> None:
    message = {
        "response_headers": pb.HttpHeaders(headers=header_map(headers)),
        "request_body": pb.HttpBody(body=b"".join(value for _, value in headers)),
        "response_body": pb.HttpBody(body=b"x"),
        "request_trailers": pb.HttpTrailers(trailers=header_map(headers)),
        "response_trailers": pb.HttpTrailers(trailers=header_map(headers)),
    }[phase]
    answer = process(compiled.policy, pb.ProcessingRequest(**{phase: message}))
    assert answer.outcome is None
    assert pb.ProcessingResponse.FromString(answer.payload).WhichOneof("response") == phase
    assert SERVER_KEY not in answer.payload


def test_the_oracle_itself_distinguishes_the_cases() -> None:
    """A property is only as good as its oracle: check it on hand-written cases."""
    keys = GatewayKeys(KEY_HEADER, ENTRIES, False)
    strict = GatewayKeys(KEY_HEADER, ENTRIES, True)
    rule = RouteRule("x-api-key", frozenset(CREDENTIAL_NAMES), True, keys)
    alice = GATEWAY_KEYS["alice"]
    cases = [
        (rule, [], Expected(False, False, False, "")),
        (rule, [("X-Gateway-Key", b" " + alice)], Expected(False, True, True, "alice")),
        (rule, [(KEY_HEADER, alice), (KEY_HEADER, b"gk-other")], Expected(False, False, False, "")),
        (rule, [(KEY_HEADER, alice), ("x-api-key", alice)], Expected(False, True, True, "alice")),
        (rule, [("authorization", b"Bearer " + alice)], Expected(False, True, True, "alice")),
        (rule, [("x-api-key", b"gk-typo"), ("authorization", b"Bearer mine")],
         Expected(True, False, False, "")),
        (rule, [("authorization", b"Bearer ")], Expected(False, False, False, "")),
        (rule, [("x-api-key", b"mine")], Expected(True, True, False, "")),
        (RouteRule("x-api-key", frozenset(CREDENTIAL_NAMES), True, strict),
         [("x-api-key", b"mine")], Expected(True, False, False, "")),
        (RouteRule("x-api-key", frozenset(CREDENTIAL_NAMES), False), [], Expected(False, True, False, "")),
    ]  # fmt: skip
    for case_rule, headers, want in cases:
        assert expected(case_rule, headers) == want
        decision = decide(case_rule, headers)
        assert isinstance(decision, Decision)
        assert (decision.outcome is Outcome.INJECTED) == want.inject
