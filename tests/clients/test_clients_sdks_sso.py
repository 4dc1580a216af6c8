"""Both Python SDKs with a person's SSO token, through real Envoy and a real OpenID provider.

The token goes where each SDK puts a key (``api_key=``, Anthropic's ``auth_token=``);
the upstream sees the organisation's key, the access log the person. The gateway's
refusals are the SDKs' own exception types: 401 ``AuthenticationError`` for a token
for another audience, 403 ``PermissionDeniedError`` naming a model the person's team
may not use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from harness import Gateway, RecordingUpstream, credential_route
from harness.adversary import poll
from harness.fakeapi import ANTHROPIC_MODELS, OPENAI_MODELS, REPLY_TEXT, anthropic_api, openai_api
from harness.oidc import OpenIdProvider, Person

pytestmark = pytest.mark.slow  # real Envoy, processor and OpenID provider

AUDIENCE = "https://gateway.test"
SERVER_ANTHROPIC, SERVER_OPENAI = "sk-ant-api03-org-sso-sdk", "sk-proj-org-sso-sdk"
ALLOWED, OTHER = ANTHROPIC_MODELS[1], ANTHROPIC_MODELS[0]
PEOPLE = [Person("ivy-cli", "ivy@example.com", ("interns",))]


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[OpenIdProvider]:
    oidc = OpenIdProvider(tmp_path, PEOPLE).start()
    try:
        yield oidc
    finally:
        oidc.stop()


@pytest.fixture
def upstreams(
    start_upstream: Callable[..., RecordingUpstream],
) -> tuple[RecordingUpstream, RecordingUpstream]:
    return (
        start_upstream("anthropic", responder=anthropic_api),
        start_upstream("openai", responder=openai_api),
    )


@pytest.fixture
def gateway(
    start_gateway: Callable[..., Gateway],
    upstreams: tuple[RecordingUpstream, RecordingUpstream],
    provider: OpenIdProvider,
) -> Gateway:
    anthropic_up, openai_up = upstreams
    routes = [
        credential_route(
            "anthropic", anthropic_up.url(), client_credentials=["authorization", "x-api-key"]
        ),
        credential_route(
            "openai", openai_up.url() + "/v1", header="authorization", format="Bearer {secret}",
            client_credentials=["authorization"], error_style="openai",
        ),
    ]  # fmt: skip
    models = {"interns": [ALLOWED, *OPENAI_MODELS]}
    sso = {"issuer": provider.issuer, "audiences": [AUDIENCE], "models": models}
    env = {"ANTHROPIC_KEY": SERVER_ANTHROPIC, "OPENAI_KEY": SERVER_OPENAI}
    return start_gateway(routes, env=env, top={"sso": sso})


def _anthropic(gateway: Gateway, **credential: str) -> anthropic.Anthropic:
    base = gateway.url("/anthropic")
    return anthropic.Anthropic(base_url=base, max_retries=0, timeout=15.0, **credential)


def _ask(client: anthropic.Anthropic, model: str) -> str:
    message = client.messages.create(
        model=model, max_tokens=16, messages=[{"role": "user", "content": "say hi"}]
    )
    block = message.content[0]
    assert block.type == "text"
    return block.text


def _logged_clients(gateway: Gateway, count: int) -> set[object]:
    entries = poll(lambda: (log := gateway.access_log()) and len(log) >= count and log, "logged")
    return {entry["client"] for entry in entries}


def test_the_sdks_send_a_persons_token_and_the_upstream_sees_the_organisations_key(
    gateway: Gateway,
    upstreams: tuple[RecordingUpstream, RecordingUpstream],
    provider: OpenIdProvider,
) -> None:
    token = provider.token("ivy-cli", AUDIENCE)
    assert _ask(_anthropic(gateway, api_key=token), ALLOWED) == REPLY_TEXT
    assert _ask(_anthropic(gateway, auth_token=token), ALLOWED) == REPLY_TEXT
    client = openai.OpenAI(base_url=gateway.url("/openai"), api_key=token, max_retries=0)
    reply = client.chat.completions.create(
        model=OPENAI_MODELS[0], messages=[{"role": "user", "content": "say hi"}]
    )
    assert reply.choices[0].message.content == REPLY_TEXT
    anthropic_up, openai_up = upstreams
    for seen in anthropic_up.requests:
        assert (seen.values("x-api-key"), seen.values("authorization")) == (
            [SERVER_ANTHROPIC.encode()], [],
        )  # fmt: skip
    assert [s.values("authorization") for s in openai_up.requests] == [
        [f"Bearer {SERVER_OPENAI}".encode()]
    ]
    assert _logged_clients(gateway, 3) == {"ivy@example.com"}


def test_the_sdks_raise_their_own_errors_for_the_gateways_refusals(
    gateway: Gateway,
    upstreams: tuple[RecordingUpstream, RecordingUpstream],
    provider: OpenIdProvider,
) -> None:
    wrong = provider.token("ivy-cli", "https://another.test")
    with pytest.raises(anthropic.AuthenticationError):
        _ask(_anthropic(gateway, api_key=wrong), ALLOWED)
    client = openai.OpenAI(base_url=gateway.url("/openai"), api_key=wrong, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(
            model=OPENAI_MODELS[0], messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.code == "invalid_api_key"
    token = provider.token("ivy-cli", AUDIENCE)
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        _ask(_anthropic(gateway, api_key=token), OTHER)
    assert f"'{OTHER}' is not allowed for your teams" in denied.value.message
    assert all(not upstream.requests for upstream in upstreams)
