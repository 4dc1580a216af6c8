"""The users of issue 10's table, their credentials, and one gateway for the real-client tests.

Three populations share one base URL: a Claude subscription (OAuth token), users
with their own API key, and users who spend the organisation's key by putting a
**gateway key** in their client's credential slot. A fourth, for tools that insist
on a key, puts a **placeholder** (``dummy``, ``EMPTY``…) there on routes that
need no gateway key.

``ClientsGateway`` runs one gateway in front of two fake providers
(``harness.fakeapi``) with these routes:

- ``/anthropic/``, ``/openai/``: gateway keys from the top-level ``access``;
- ``/open/anthropic/``, ``/open/openai/``: ``access: false`` (placeholders count as blank);
- ``/strict/anthropic/``: ``for_client_credentials: true`` (OAuth users need a gateway key too).

Expected credentials are written with ``GK`` where the gateway key goes
(``keygen`` makes a new one per run); ``resolve`` fills it in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.adversary import keygen, leaks
from harness.fakeapi import anthropic_api, openai_api
from harness.gateway import Gateway, credential_route
from harness.upstream import RecordedRequest, RecordingUpstream

GK = "<gateway key>"  # stands for the gateway key in the tables
SERVER_ANTHROPIC = "sk-ant-api03-organisation-server-key-for-clients"
SERVER_OPENAI = "sk-proj-organisation-server-key-for-clients"
OWN_ANTHROPIC = "sk-ant-api03-users-own-key-for-clients"
OWN_OPENAI = "sk-proj-users-own-key-for-clients"
OAUTH = "sk-ant-oat01-users-subscription-token-for-clients"
MISTYPED_GK = "gk-not-a-key-this-gateway-made"
PLACEHOLDERS = ("dummy", "EMPTY", "sk-no-key-required")
# Every header a credential travels in; tests compare all of them at once, so an extra
# (say the gateway key left in x-api-key beside the injected one) fails the test.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-gateway-key")

Expected = Mapping[str, Iterable[str]]


@dataclass(frozen=True)
class Population:
    """How one kind of user sets up an SDK, and which credentials the provider must then see."""

    prefix: str  # the route in the client's base URL, e.g. "/anthropic"
    arguments: Mapping[str, Any]  # the client's credential arguments (``GK``: the gateway key)
    expected: Expected  # every credential header upstream, by name, in order


def resolve(value: Any, gateway_key: str) -> Any:
    """``value`` (a string, list or dict of them) with ``GK`` replaced by the gateway key."""
    if isinstance(value, str):
        return value.replace(GK, gateway_key)
    if isinstance(value, Mapping):
        return {key: resolve(item, gateway_key) for key, item in value.items()}
    return [resolve(item, gateway_key) for item in value]


def expected_credentials(expected: Expected, gateway_key: str) -> dict[str, list[bytes]]:
    """A table's expected credential headers as ``credentials`` returns them."""
    return {
        name: [resolve(value, gateway_key).encode() for value in values]
        for name, values in expected.items()
    }


def credentials(request: RecordedRequest) -> dict[str, list[bytes]]:
    """The credential headers the upstream received, every one (absent ones left out)."""
    seen = {name: request.values(name) for name in CREDENTIAL_HEADERS}
    return {name: values for name, values in seen.items() if values}


class ClientsGateway:
    """A running gateway with both fake providers; ``start()`` then ``stop()``."""

    name = "clients-gateway"

    def __init__(self, workdir: Path, *, fast_path: bool = True) -> None:
        self.workdir = workdir
        self.fast_path = fast_path
        self.anthropic = RecordingUpstream("anthropic-upstream", responder=anthropic_api)
        self.openai = RecordingUpstream("openai-upstream", responder=openai_api)
        self.gateway_key = ""
        self.gateway: Gateway | None = None
        self._stack = ExitStack()

    def start(self) -> ClientsGateway:
        with ExitStack() as stack:
            stack.enter_context(self.anthropic)
            stack.enter_context(self.openai)
            keys_file = self.workdir / "gateway-keys.txt"
            self.gateway_key = keygen("clients", keys_file)
            gateway = Gateway(
                self.workdir,
                self._routes(keys_file),
                env={"ANTHROPIC_KEY": SERVER_ANTHROPIC, "OPENAI_KEY": SERVER_OPENAI},
                extproc={"fast_path": self.fast_path},
                top={
                    "access": {"keys_file": str(keys_file), "header": "x-gateway-key"},
                    "placeholders": list(PLACEHOLDERS),
                },
            )
            self.gateway = stack.enter_context(gateway)
            self._stack = stack.pop_all()
        return self

    def _routes(self, keys_file: Path) -> list[dict[str, Any]]:
        anthropic: dict[str, Any] = {
            "header": "x-api-key",
            "client_credentials": ["authorization", "x-api-key"],
        }
        openai: dict[str, Any] = {"header": "authorization", "format": "Bearer {secret}",
                  "client_credentials": ["authorization"], "error_style": "openai"}  # fmt: skip
        anthropic_url, openai_url = self.anthropic.url(), self.openai.url() + "/v1"
        strict = {"keys_file": str(keys_file), "for_client_credentials": True}
        return [
            credential_route("anthropic", anthropic_url, **anthropic),
            credential_route("openai", openai_url, **openai),
            credential_route("open-anthropic", anthropic_url, prefix="/open/anthropic/",
                             secret={"env": "ANTHROPIC_KEY"}, access=False, **anthropic),
            credential_route("open-openai", openai_url, prefix="/open/openai/",
                             secret={"env": "OPENAI_KEY"}, access=False, **openai),
            credential_route("strict-anthropic", anthropic_url, prefix="/strict/anthropic/",
                             secret={"env": "ANTHROPIC_KEY"}, access=strict, **anthropic),
        ]  # fmt: skip

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> ClientsGateway:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- what tests use --------------------------------------------------------------------

    @property
    def running(self) -> Gateway:
        assert self.gateway is not None, "start() first"
        return self.gateway

    def url(self, prefix: str) -> str:
        """The base URL a client is given, e.g. ``url("/anthropic")`` (no trailing slash)."""
        return self.running.url(prefix)

    def upstreams(self) -> tuple[RecordingUpstream, RecordingUpstream]:
        return self.anthropic, self.openai

    def requests(self) -> list[RecordedRequest]:
        return [seen for upstream in self.upstreams() for seen in upstream.requests]

    def check_reached(self, upstream: RecordingUpstream, path: str, population: Population) -> None:
        """``upstream`` got one request, for ``path``, with exactly the population's credentials."""
        seen = upstream.only_request()
        assert seen.path == path
        key = self.gateway_key
        assert credentials(seen) == expected_credentials(population.expected, key)
        assert self.leaked() == []

    def leaked(self) -> list[str]:
        """Gateway keys found anywhere an upstream could see them (headers, targets, bodies)."""
        blobs = [
            b"\n".join([seen.target.encode(), *(value for _, value in seen.headers), seen.body])
            for seen in self.requests()
        ]
        return leaks([self.gateway_key, MISTYPED_GK], *blobs)

    def report(self) -> str:
        parts = [self.running.report()] if self.gateway is not None else []
        return "\n".join([*parts, *(upstream.report() for upstream in self.upstreams())])
