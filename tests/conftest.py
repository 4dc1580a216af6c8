"""Fixtures that start real upstreams and gateways, and show their logs when a test fails.

Anything with a ``report()`` method that a fixture passes to ``watch`` has its
report attached to the failing test's output (setup or call); passing tests
print nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from harness import Gateway, RecordingUpstream
from harness.gateway import Route
from harness.liveops import LiveGateway


class Reporter(Protocol):
    name: str

    def report(self) -> str: ...


_WATCHED = pytest.StashKey[list[Reporter]]()
G = TypeVar("G", bound=Gateway)


def _watch(request: pytest.FixtureRequest, *things: Reporter) -> None:
    request.node.stash.setdefault(_WATCHED, []).extend(things)


@pytest.fixture
def watch(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``watch(*things)``: show their reports if this test fails (for module-scoped gateways)."""
    return lambda *things: _watch(request, *things)


@pytest.fixture
def reuse(watch: Callable[..., None]) -> Callable[..., None]:
    """``reuse(gateway, *upstreams)``: hand a module-scoped gateway to this test.

    The upstreams forget what earlier tests sent them, so a test sees only its
    own requests; the gateway's and upstreams' reports show if this test fails.
    """

    def hand_over(gateway: Gateway, *upstreams: RecordingUpstream) -> None:
        for upstream in upstreams:
            upstream.clear()
        watch(gateway, *upstreams)

    return hand_over


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for thing in item.stash.get(_WATCHED, []):
            report.sections.append((f"report of {thing.name}", thing.report()))
    return report


@pytest.fixture
def start_upstream(request: pytest.FixtureRequest) -> Iterator[Callable[..., RecordingUpstream]]:
    """``start_upstream(name, tls=None)`` → a running RecordingUpstream, stopped after the test."""
    with ExitStack() as stack:

        def start(name: str = "upstream", **options: Any) -> RecordingUpstream:
            upstream = RecordingUpstream(name, **options)
            _watch(request, upstream)
            return stack.enter_context(upstream)

        yield start


@pytest.fixture
def upstream(start_upstream: Callable[..., RecordingUpstream]) -> RecordingUpstream:
    return start_upstream("upstream")


@pytest.fixture
def start_gateway(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    """``start_gateway(routes, env=..., listener=..., extproc=..., top=...)`` → a running Gateway.

    Every gateway started is stopped after the test (Envoy first), pass or fail,
    even when stopping another one fails.
    """
    yield from _gateways(request, tmp_path, Gateway, "gateway")


@pytest.fixture
def start_live(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., LiveGateway]]:
    """``start_live(routes, **options)`` → a running LiveGateway (reload, restart, metrics).

    Stopped after the test like the gateways of ``start_gateway``.
    """
    yield from _gateways(request, tmp_path, LiveGateway, "live")


def _gateways(
    request: pytest.FixtureRequest, tmp_path: Path, kind: type[G], folder: str
) -> Iterator[Callable[..., G]]:
    with ExitStack() as stack:
        count = itertools.count()

        def start(routes: Sequence[Route], **options: Any) -> G:
            gateway = kind(tmp_path / f"{folder}-{next(count)}", routes, **options)
            _watch(request, gateway)
            stack.enter_context(gateway)
            return gateway

        yield start
