"""The ``anthropic`` Python SDK through the gateway: each population, each call it makes.

The SDK (2.x) sends ``api_key=`` as ``Authorization: Bearer <key>`` (not ``x-api-key``)
and ``auth_token=`` the same way. The fake upstream records what arrived; each
test checks every credential header it received, that no gateway key reached it,
and that the SDK parsed the reply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anthropic
import pytest
from harness.fakeapi import ANTHROPIC_MODELS, REPLY_TEXT
from harness.populations import (
    GK,
    MISTYPED_GK,
    OAUTH,
    OWN_ANTHROPIC,
    SERVER_ANTHROPIC,
    ClientsGateway,
    Population,
    resolve,
)

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes

MODEL = ANTHROPIC_MODELS[0]
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "say hi"}]

POPULATIONS = [
    pytest.param(Population("/anthropic", {"api_key": OWN_ANTHROPIC}, {"authorization": [f"Bearer {OWN_ANTHROPIC}"]}), id="own API key as api_key passes byte for byte"),
    pytest.param(Population("/anthropic", {"auth_token": OAUTH}, {"authorization": [f"Bearer {OAUTH}"]}), id="OAuth token as auth_token passes byte for byte"),
    pytest.param(Population("/anthropic", {"api_key": GK}, {"x-api-key": [SERVER_ANTHROPIC]}), id="gateway key as api_key spends the organisation's key"),
    pytest.param(Population("/open/anthropic", {"api_key": "dummy"}, {"x-api-key": [SERVER_ANTHROPIC]}), id="placeholder as api_key spends the organisation's key"),
]  # fmt: skip


def create(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == REPLY_TEXT  # type: ignore[union-attr]
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0


def stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as events:
        text = "".join(events.text_stream)
        final = events.get_final_message()
    assert text == REPLY_TEXT
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def count_tokens(client: anthropic.Anthropic) -> None:
    assert client.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens > 0


def models(client: anthropic.Anthropic) -> None:
    assert [model.id for model in client.models.list()] == list(ANTHROPIC_MODELS)


CALLS = [  # (the call, which checks the parsed reply; the path the upstream must see)
    pytest.param(create, "/v1/messages", id="messages.create"),
    pytest.param(stream, "/v1/messages", id="messages.stream"),
    pytest.param(count_tokens, "/v1/messages/count_tokens", id="messages.count_tokens"),
    pytest.param(models, "/v1/models", id="models.list"),
]


def sdk(base_url: str, arguments: Mapping[str, Any]) -> anthropic.Anthropic:
    """A client that fails at once instead of retrying, so a test sees the first answer."""
    return anthropic.Anthropic(base_url=base_url, max_retries=0, timeout=15.0, **arguments)


@pytest.mark.parametrize(("call", "path"), CALLS)
@pytest.mark.parametrize("population", POPULATIONS)
def test_anthropic_sdk(
    clients_gateway: ClientsGateway,
    population: Population,
    call: Callable[[anthropic.Anthropic], None],
    path: str,
) -> None:
    key = clients_gateway.gateway_key
    call(sdk(clients_gateway.url(population.prefix), resolve(population.arguments, key)))
    clients_gateway.check_reached(clients_gateway.anthropic, path, population)


def test_anthropic_sdk_mistyped_gateway_key_gets_401_and_reaches_no_upstream(
    clients_gateway: ClientsGateway,
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as failure:
        create(sdk(clients_gateway.url("/anthropic"), {"api_key": MISTYPED_GK}))

    assert failure.value.status_code == 401
    body = failure.value.response.json()  # the Anthropic error shape, from the gateway itself
    assert (body["type"], body["error"]["type"]) == ("error", "authentication_error")
    assert clients_gateway.requests() == []
