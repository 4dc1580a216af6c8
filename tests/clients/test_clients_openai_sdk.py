"""The ``openai`` Python SDK through the gateway: each population, each call it makes.

The SDK has one credential slot, ``api_key=``, sent as ``Authorization: Bearer <key>``;
a subscription-style bearer token goes there too, so on the wire it is the "own key"
case. The OpenAI routes put the server key in ``Authorization: Bearer``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import openai
import pytest
from harness.fakeapi import OPENAI_MODELS, REPLY_TEXT
from harness.populations import (
    GK,
    MISTYPED_GK,
    OWN_OPENAI,
    SERVER_OPENAI,
    ClientsGateway,
    Population,
    resolve,
)

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes

MODEL = OPENAI_MODELS[0]
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "say hi"}
]

POPULATIONS = [
    pytest.param(Population("/openai", {"api_key": OWN_OPENAI}, {"authorization": [f"Bearer {OWN_OPENAI}"]}), id="own API key passes byte for byte"),
    pytest.param(Population("/openai", {"api_key": GK}, {"authorization": [f"Bearer {SERVER_OPENAI}"]}), id="gateway key as api_key spends the organisation's key"),
    pytest.param(Population("/open/openai", {"api_key": "EMPTY"}, {"authorization": [f"Bearer {SERVER_OPENAI}"]}), id="placeholder EMPTY as api_key spends the organisation's key"),
    pytest.param(Population("/open/openai", {"api_key": "sk-no-key-required"}, {"authorization": [f"Bearer {SERVER_OPENAI}"]}), id="placeholder sk-no-key-required as api_key spends the organisation's key"),
]  # fmt: skip


def create(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == REPLY_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0


def stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text == REPLY_TEXT
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def models(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == list(OPENAI_MODELS)


CALLS = [  # (the call, which checks the parsed reply; the path the upstream must see)
    pytest.param(create, "/v1/chat/completions", id="chat.completions.create"),
    pytest.param(stream, "/v1/chat/completions", id="chat.completions.create stream"),
    pytest.param(models, "/v1/models", id="models.list"),
]


def sdk(base_url: str, arguments: Mapping[str, Any]) -> openai.OpenAI:
    """A client that fails at once instead of retrying, so a test sees the first answer."""
    return openai.OpenAI(base_url=base_url, max_retries=0, timeout=15.0, **arguments)


@pytest.mark.parametrize(("call", "path"), CALLS)
@pytest.mark.parametrize("population", POPULATIONS)
def test_openai_sdk(
    clients_gateway: ClientsGateway,
    population: Population,
    call: Callable[[openai.OpenAI], None],
    path: str,
) -> None:
    key = clients_gateway.gateway_key
    call(sdk(clients_gateway.url(population.prefix), resolve(population.arguments, key)))
    clients_gateway.check_reached(clients_gateway.openai, path, population)


def test_openai_sdk_mistyped_gateway_key_gets_401_and_reaches_no_upstream(
    clients_gateway: ClientsGateway,
) -> None:
    with pytest.raises(openai.AuthenticationError) as failure:
        create(sdk(clients_gateway.url("/openai"), {"api_key": MISTYPED_GK}))

    assert failure.value.status_code == 401
    body: Any = failure.value.response.json()  # the OpenAI error shape, from the gateway itself
    assert body["error"]["code"] == "invalid_api_key"
    assert clients_gateway.requests() == []
