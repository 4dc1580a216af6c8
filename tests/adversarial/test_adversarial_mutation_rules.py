"""Envoy's mutation rules hold even against a processor that misbehaves.

The real processor only ever sets the route's credential header and removes
blank credential headers. Here a rogue ext_proc server takes its port and
answers with other mutations, to show that Envoy itself (``mutation_rules``:
``disallow_all`` + the credential names, ``disallow_is_error``) refuses
anything else: the request fails and never reaches the upstream. Mutations of
the credential headers still go through, so the rules are not simply "nothing".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from harness import Gateway, RecordingUpstream, credential_route, raw_request
from harness.adversary import RogueProcessor

SERVER_KEY = "sk-mutation-rules-server-key"
ROGUE = b"rogue-value"

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


def setting(name: str, value: bytes = ROGUE) -> pb.ProcessingResponse:
    option = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    return mutation(pb.HeaderMutation(set_headers=[option]))


def removing(name: str) -> pb.ProcessingResponse:
    return mutation(pb.HeaderMutation(remove_headers=[name]))


def mutation(change: pb.HeaderMutation) -> pb.ProcessingResponse:
    common = pb.CommonResponse(header_mutation=change)
    return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, RecordingUpstream]]:
    with RecordingUpstream("upstream") as upstream:
        route = credential_route("anthropic", upstream.url())
        gateway = Gateway(
            tmp_path_factory.mktemp("mutation"),
            [route],
            env={"ANTHROPIC_KEY": SERVER_KEY},
            extproc={"fast_path": False},  # every request asks the processor
        )
        with gateway:
            gateway.stop_extproc()  # the rogue takes its port
            yield gateway, upstream


@pytest.fixture
def rogue(
    shared: tuple[Gateway, RecordingUpstream], watch: Callable[..., None]
) -> Iterator[RogueProcessor]:
    gateway, upstream = shared
    upstream.clear()
    with RogueProcessor(gateway.extproc_port, b"") as server:
        watch(gateway, upstream, server)
        yield server


FORBIDDEN = {
    "set-host->refused": setting("host", b"evil.example"),
    "set-authority->refused": setting(":authority", b"evil.example"),
    "set-path->refused": setting(":path", b"/elsewhere"),
    "set-method->refused": setting(":method", b"DELETE"),
    "set-scheme->refused": setting(":scheme", b"https"),
    "set-x-envoy-header->refused": setting("x-envoy-upstream-alt-stat-name"),
    "set-other-header->refused": setting("x-forwarded-for", b"10.0.0.1"),
    "set-gateway-key-header->refused": setting("x-gateway-key"),
    "set-cookie->refused": setting("cookie", b"session=stolen"),
    "remove-host->refused": removing("host"),
    "remove-authority->refused": removing(":authority"),
    "remove-other-header->refused": removing("content-type"),
}


@pytest.mark.parametrize("answer", FORBIDDEN.values(), ids=FORBIDDEN.keys())
def test_processor_mutation_outside_the_credential_headers_fails_the_request(
    shared: tuple[Gateway, RecordingUpstream], rogue: RogueProcessor, answer: pb.ProcessingResponse
) -> None:
    gateway, upstream = shared
    rogue.answer = answer.SerializeToString()
    reply = raw_request(
        gateway.listener_port, "/anthropic/v1/m", [("content-type", "application/json")]
    )
    assert rogue.seen == 1, "the rogue processor was not asked"
    assert reply.status >= 500
    assert upstream.requests == []


ALLOWED = {
    "set-x-api-key->forwarded": (setting("x-api-key"), "x-api-key", [ROGUE]),
    "set-authorization->forwarded": (setting("authorization"), "authorization", [ROGUE]),
    "remove-authorization->forwarded-without-it": (removing("authorization"), "authorization", []),
}


@pytest.mark.parametrize(("answer", "name", "values"), ALLOWED.values(), ids=ALLOWED.keys())
def test_processor_mutation_of_a_credential_header_goes_through(
    shared: tuple[Gateway, RecordingUpstream],
    rogue: RogueProcessor,
    answer: pb.ProcessingResponse,
    name: str,
    values: list[bytes],
) -> None:
    gateway, upstream = shared
    rogue.answer = answer.SerializeToString()
    reply = raw_request(gateway.listener_port, "/anthropic/v1/m", [("authorization", "")])
    assert reply.status == 200
    assert upstream.only_request().values(name) == values
