"""The gateway the real-client tests share: started once per fast-path mode for the folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from harness import FAST_PATH_IDS, FAST_PATH_MODES
from harness.populations import ClientsGateway


@pytest.fixture(scope="package", params=FAST_PATH_MODES, ids=FAST_PATH_IDS)
def shared_clients_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClientsGateway]:
    with ClientsGateway(tmp_path_factory.mktemp("clients"), fast_path=request.param) as running:
        yield running


@pytest.fixture
def clients_gateway(
    shared_clients_gateway: ClientsGateway, watch: Callable[..., None]
) -> ClientsGateway:
    """The shared gateway with its upstreams' records cleared; its report shows on failure."""
    for upstream in shared_clients_gateway.upstreams():
        upstream.clear()
    watch(shared_clients_gateway)
    return shared_clients_gateway
