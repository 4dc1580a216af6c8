"""A gateway that the tests of one module share, started once per fast-path mode.

Starting Envoy and the processor costs seconds, so a module whose tests only
send requests starts them once (module scope) and every test reuses them,
with the upstreams' records cleared first. ``reuse`` (``tests/conftest.py``)
does that hand-over for any shared setup; ``one_upstream_gateway`` builds the
three fixtures of the common case, one recording upstream behind the gateway::

    shared, gateway, upstream = one_upstream_gateway(
        "sse", lambda url: [credential_route("anthropic", url)], env={"ANTHROPIC_KEY": KEY}
    )
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from harness.gateway import FAST_PATH_IDS, FAST_PATH_MODES, Gateway, Route
from harness.upstream import RecordingUpstream

Shared = tuple[Gateway, RecordingUpstream]


@contextmanager
def running_upstreams(names: Iterable[str]) -> Iterator[dict[str, RecordingUpstream]]:
    """Recording upstreams ``<name>-upstream`` by name, all stopped on exit even if one fails."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(RecordingUpstream(f"{name}-upstream")) for name in names}


def one_upstream_gateway(
    name: str,
    routes: Callable[[str], list[Route]],
    env: Mapping[str, str] | None = None,
) -> tuple[Any, Any, Any]:
    """The fixtures ``shared``, ``gateway`` and ``upstream`` for one upstream behind one gateway.

    ``routes`` gets the upstream's URL; ``env`` is the processor's environment
    (its secrets). ``shared`` runs once per fast-path mode, so every test of the
    module runs with the fast path on and with every request through the processor.
    """

    @pytest.fixture(scope="module", params=FAST_PATH_MODES, ids=FAST_PATH_IDS)
    def shared(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Shared]:
        with RecordingUpstream(f"{name}-upstream") as upstream:
            running = Gateway(
                tmp_path_factory.mktemp(name),
                routes(upstream.url()),
                env=env or {},
                extproc={"fast_path": request.param},
            )
            with running:
                yield running, upstream

    @pytest.fixture
    def gateway(shared: Shared, reuse: Callable[..., None]) -> Gateway:
        reuse(*shared)
        return shared[0]

    @pytest.fixture
    def upstream(shared: Shared, gateway: Gateway) -> RecordingUpstream:
        return shared[1]

    return shared, gateway, upstream
