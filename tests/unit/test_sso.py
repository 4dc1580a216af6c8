"""The ``sso:`` section, its Envoy filter, and the processor naming a person from Envoy's payload.

The discovery document is served by a real HTTP server on a free port; the
payloads are the Struct Envoy's ``jwt_authn`` puts in the metadata it forwards.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct

from extproc.config.load import load_config
from extproc.config.sections import ConfigError
from extproc.policy.access import GatewayKeys, Identity, KeyTable, key_digest
from extproc.policy.decision import Outcome, RouteRule, decide
from extproc.policy.people import NAMESPACE, NOBODY, Claims
from extproc.render import jwt, models
from extproc.render.bootstrap import render_bootstrap
from extproc.token_cli import cached

BASE = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - name: anthropic
    prefix: /anthropic/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: K}}
"""
JWKS = "https://login.example.com/keys"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


@pytest.fixture
def discovery() -> Iterator[dict[str, Any]]:
    """A provider's discovery document at ``document["issuer"]``, served for real."""
    document: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/.well-known/openid-configuration"
            body = json.dumps(document).encode()
            self.send_response(200 if found else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    issuer = f"http://127.0.0.1:{server.server_port}"
    document.update(issuer=issuer, jwks_uri=issuer + "/jwks")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield document
    finally:
        server.shutdown()
        server.server_close()


def test_jwks_uri_is_found_through_the_discovery_document(
    tmp_path: Path, discovery: dict[str, Any]
) -> None:
    text = BASE + f"sso: {{issuer: {discovery['issuer']}, audiences: [gw]}}\n"
    sso = load_config(write(tmp_path, text)).sso
    assert sso is not None
    assert sso.jwks_uri == discovery["jwks_uri"]
    assert (sso.client_claim, sso.groups_claim, sso.clock_skew_s, sso.cache_s) == (
        "email", "groups", 60, 300,
    )  # fmt: skip


def test_an_issuer_whose_document_names_another_fails_the_load(
    tmp_path: Path, discovery: dict[str, Any]
) -> None:
    issuer = discovery["issuer"]
    discovery["issuer"] = "https://elsewhere.example.com"
    found = problems(tmp_path, BASE + f"sso: {{issuer: {issuer}, audiences: [gw]}}\n")
    assert found == (f"gateway.yaml:7 sso.issuer: {issuer}/.well-known/openid-configuration "
                     "names another issuer or no jwks_uri",)  # fmt: skip


def test_an_unreachable_issuer_names_the_document_and_the_fix(tmp_path: Path) -> None:
    issuer = "http://127.0.0.1:9"  # discard: nothing listens
    (found,) = problems(tmp_path, BASE + f"sso: {{issuer: '{issuer}', audiences: [gw]}}\n")
    assert found.startswith(
        f"gateway.yaml:7 sso.issuer: cannot read the discovery document {issuer}"
    )
    assert found.endswith("; or set jwks_uri")


def test_every_mistake_is_reported_with_its_line(tmp_path: Path) -> None:
    text = BASE + (
        "sso:\n"
        "  issuer: ftp://x\n"
        "  audiences: []\n"
        "  client_claim: 'has space'\n"
        "  clock_skew_s: 0\n"
        "  models: {ml: []}\n"
        "  extra: 1\n"
    )
    assert problems(tmp_path, text) == (
        "gateway.yaml:13 sso.extra: unknown field (allowed: audiences, ca_file, cache_s, "
        "client_claim, clock_skew_s, groups_claim, issuer, jwks_uri, models)",
        "gateway.yaml:8 sso.issuer: expected an http:// or https:// URL with a host",
        "gateway.yaml:9 sso.audiences: give at least one audience",
        "gateway.yaml:10 sso.client_claim: expected a claim name "
        "(letters, digits, '_', '.', ':', '/', '-')",
        "gateway.yaml:11 sso.clock_skew_s: must be between 1 and 600, got 0",
        "gateway.yaml:12 sso.models.ml: expected a non-empty list of model names",
    )


def _rendered(tmp_path: Path) -> dict[str, Any]:
    text = BASE + f"sso: {{issuer: https://login.example.com, audiences: [gw], jwks_uri: {JWKS}}}\n"
    return render_bootstrap(load_config(write(tmp_path, text)))


def _filters(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["http_filters"])


def test_the_jwt_filter_comes_first_removes_tokens_and_forwards_payloads(tmp_path: Path) -> None:
    filters = _filters(_rendered(tmp_path))
    assert [f["name"] for f in filters[:2]] == [jwt.FILTER, "envoy.filters.http.ext_proc"]
    config = filters[0]["typed_config"]
    providers = config["providers"]
    assert sorted(providers) == ["sso_authorization", "sso_x-api-key"]
    for slot, provider in (("authorization", "sso_authorization"), ("x-api-key", "sso_x-api-key")):
        assert providers[provider]["forward"] is False
        assert providers[provider]["require_expiration"] is True
        assert providers[provider]["payload_in_metadata"] == slot
        assert providers[provider]["remote_jwks"]["http_uri"]["uri"] == JWKS
    # Both slots, then each alone: a request with no JWT matches no rule and passes.
    assert len(config["rules"]) == 3
    ext_proc = filters[1]["typed_config"]
    assert ext_proc["metadata_options"]["forwarding_namespaces"] == {"untyped": [NAMESPACE]}


def _payloads(**slots: dict[str, Any]) -> dict[str, Struct]:
    struct = Struct()
    for slot, claims in slots.items():
        struct.fields[slot].struct_value.update(claims)
    return {NAMESPACE: struct}


def test_the_payload_names_the_person_and_their_groups_are_teams() -> None:
    claims = Claims()
    found = claims.identify(
        _payloads(authorization={"email": "a@x.org", "groups": ["ml", "bad name", "ml"]})
    )
    assert found == Identity("a@x.org", ("ml",))
    assert claims.identify({}) is None
    assert claims.identify(_payloads(authorization={"sub": "a"})) is NOBODY
    many = [f"g{i:03}" for i in range(100)]
    limited = Claims(first=frozenset({"g099"})).identify(
        _payloads(authorization={"email": "a@x.org", "groups": many})
    )
    assert limited is not None and len(limited.teams) == 32 and "g099" in limited.teams
    two = _payloads(authorization={"email": "a@x.org"}, **{"x-api-key": {"email": "b@x.org"}})
    assert claims.identify(two) is NOBODY  # two tokens naming two people


GK = b"gk-ci-bot-0123456789abcdef0123456789abcdef"
KEYS = GatewayKeys(
    "x-gateway-key",
    KeyTable({bytes.fromhex(key_digest(GK.decode())): Identity("ci-bot")}),
    False,
)
RULE = RouteRule("x-api-key", frozenset({"x-api-key", "authorization"}), True, KEYS)


def test_a_person_spends_the_server_key_like_a_gateway_key() -> None:
    decision = decide(RULE, [], Identity("a@x.org", ("ml",)))
    assert (decision.outcome, decision.client, decision.teams) == (
        Outcome.INJECTED, "a@x.org", ("ml",),
    )  # fmt: skip
    assert decide(RULE, []).outcome is Outcome.NO_CREDENTIAL  # before: no token, no key


def test_a_token_naming_nobody_or_beside_another_clients_key_is_denied() -> None:
    assert decide(RULE, [], NOBODY).outcome is Outcome.DENIED
    beside = decide(RULE, [("x-api-key", GK)], Identity("a@x.org"))
    assert beside.outcome is Outcome.DENIED


def test_a_cached_token_is_renewed_before_it_expires(tmp_path: Path) -> None:
    cache = tmp_path / "token.json"
    assert cached(cache, 0.0) is None  # no file
    cache.write_text(json.dumps({"access_token": "t", "issued_at": 1000, "expires_at": 1600}))
    assert cached(cache, 1000.0) == "t"
    assert cached(cache, 1479.0) == "t"
    assert cached(cache, 1480.0) is None  # a fifth of its 10 minutes left: renew
    cache.write_text("{not json")
    assert cached(cache, 1000.0) is None


def test_model_allowlists_read_the_body_in_envoy_after_the_processor_names_teams(
    tmp_path: Path,
) -> None:
    text = BASE + (
        f"sso: {{issuer: https://login.example.com, audiences: [gw], jwks_uri: {JWKS},\n"
        "      models: {interns: [claude-haiku-4-5]}}\n"
    )
    bootstrap = render_bootstrap(load_config(write(tmp_path, text)))
    names = [f["name"] for f in _filters(bootstrap)][:4]
    assert names == [
        jwt.FILTER, "envoy.filters.http.ext_proc", "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.rbac",
    ]  # fmt: skip
    rbac = _filters(bootstrap)[3]["typed_config"]["rules"]
    assert rbac["action"] == "ALLOW" and sorted(rbac["policies"]) == [
        "team_interns",
        "unrestricted",
    ]
    listener = bootstrap["static_resources"]["listeners"][0]
    table = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    forwarding = [r for r in table["virtual_hosts"][0]["routes"] if "route" in r]
    assert forwarding and all(
        r["request_body_buffer_limit"] == models.BODY_LIMIT_BYTES for r in forwarding
    )
    assert models.http_filters(load_config(write(tmp_path, BASE))) == []  # no sso: nothing read


def test_a_jwt_envoy_did_not_verify_is_never_passed_on() -> None:
    """Envoy checks only values shaped like a JWT; anything else starting like one is denied."""
    people = RouteRule(
        "x-api-key", frozenset({"x-api-key", "authorization"}), True, KEYS, people=True
    )
    odd = b"eyJhbGciOi.not-three-parts"
    for header, value in (("x-api-key", odd), ("authorization", b"Bearer " + odd)):
        assert decide(people, [(header, value)]).outcome is Outcome.DENIED
        assert decide(people, [(header, value)], Identity("a@x.org")).outcome is Outcome.DENIED
        assert decide(RULE, [(header, value)]).outcome.credential_source == "client"  # no SSO
    own = decide(people, [("x-api-key", b"sk-ant-api03-own")])
    assert own.outcome is Outcome.CLIENT_API_KEY
