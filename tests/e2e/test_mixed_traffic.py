"""Thousands of interleaved requests: every upstream request carries exactly what it should.

Six clients (four HTTP/1.1, two HTTP/2, all keep-alive) send a shuffled mix
across two routes guarded by gateway keys: ``alpha`` (x-api-key style) and
``beta`` (``Authorization: Bearer`` style, where x-api-key is not a
credential). Each request carries a unique id and, when it brings its own
credential, a unique one, so every upstream request is matched to the request
that caused it. The test counts requests per category on both sides (what
should have arrived, what did) and then checks every request's headers.
With the fast path off, all of them go through the processor at once, so an
answer given on the wrong stream would show up here as a wrong credential.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from harness import (
    FAST_PATH_IDS,
    FAST_PATH_MODES,
    Gateway,
    RecordingUpstream,
    credential_route,
    http1,
    http2,
)
from harness.adversary import flatten, leaks, write_keys

ALPHA_KEY = "sk-alpha-mixed-traffic-secret"
BETA_KEY = "sk-beta-mixed-traffic-secret"
GATEWAY_KEYS = {"alice": "gk-alice-mixed-traffic", "bob": "gk-bob-mixed-traffic"}
SECRETS = [ALPHA_KEY, BETA_KEY, *GATEWAY_KEYS.values()]
CLIENTS = (http1, http1, http1, http1, http2, http2)
PER_CLIENT = 500  # 3000 requests in all

ROUTES = ("alpha", "beta")
CREDENTIALS = ("none", "blank", "client_key", "oauth")
GATEWAY = ("none", "alice", "bob", "wrong")

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


@dataclass(frozen=True)
class Planned:
    """One request: what is sent and what the upstream must receive for it."""

    id: str
    route: str
    credential: str
    gateway: str

    @property
    def category(self) -> tuple[str, str, str]:
        return (self.route, self.credential, self.gateway)

    def headers(self) -> dict[str, str]:
        headers = {"x-test-id": self.id}
        if self.credential == "blank":  # blank as clients send it (h2 refuses padded values)
            headers.update(
                {"x-api-key": ""} if self.route == "alpha" else {"authorization": "Bearer"}
            )
        elif self.credential == "client_key":
            headers["x-api-key"] = f"sk-client-{self.id}"
        elif self.credential == "oauth":
            headers["authorization"] = f"Bearer sk-ant-oat01-{self.id}"
        if self.gateway != "none":
            headers["x-gateway-key"] = GATEWAY_KEYS.get(self.gateway, "gk-wrong-key")
        return headers

    def forwarded(self) -> bool:
        client_pays = self.credential == "oauth" or (
            self.credential == "client_key" and self.route == "alpha"
        )
        return client_pays or self.gateway in GATEWAY_KEYS

    def expected(self) -> tuple[list[bytes], list[bytes]]:
        """(x-api-key values, authorization values) the upstream must see."""
        client_key = [f"sk-client-{self.id}".encode()] if self.credential == "client_key" else []
        if self.credential == "oauth":
            return client_key, [f"Bearer sk-ant-oat01-{self.id}".encode()]
        if self.route == "alpha":
            return client_key or [ALPHA_KEY.encode()], []
        return client_key, [f"Bearer {BETA_KEY}".encode()]  # x-api-key is no credential here


def plan(seed: int) -> list[list[Planned]]:
    """Every category equally often, shuffled, dealt out to the clients."""
    rng = random.Random(seed)
    categories = [(r, c, g) for r in ROUTES for c in CREDENTIALS for g in GATEWAY]
    total = PER_CLIENT * len(CLIENTS)
    requests = [Planned(f"r{n}", *categories[n % len(categories)]) for n in range(total)]
    rng.shuffle(requests)
    return [requests[i :: len(CLIENTS)] for i in range(len(CLIENTS))]


@pytest.fixture(params=FAST_PATH_MODES, ids=FAST_PATH_IDS)
def gateway_and_upstreams(
    request: pytest.FixtureRequest,
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> tuple[Gateway, dict[str, RecordingUpstream]]:
    upstreams = {name: start_upstream(f"{name}-upstream") for name in ROUTES}
    write_keys(tmp_path / "keys.txt", GATEWAY_KEYS)
    routes = [
        credential_route("alpha", upstreams["alpha"].url()),
        credential_route(
            "beta",
            upstreams["beta"].url(),
            header="authorization",
            format="Bearer {secret}",
            client_credentials=["authorization"],
        ),
    ]
    gateway = start_gateway(
        routes,
        env={"ALPHA_KEY": ALPHA_KEY, "BETA_KEY": BETA_KEY},
        extproc={"fast_path": request.param},
        top={"access": {"keys_file": str(tmp_path / "keys.txt")}},
    )
    return gateway, upstreams


def run_client(
    make: Callable[[str], httpx.Client],
    base_url: str,
    work: list[Planned],
    start: threading.Barrier,
) -> list[tuple[Planned, int, bytes]]:
    """Send ``work`` in order on one keep-alive connection; (request, status, whole reply)."""
    results = []
    with make(base_url) as client:
        start.wait()
        for planned in work:
            reply = client.post(
                f"/{planned.route}/v1/messages", content=b"{}", headers=planned.headers()
            )
            everything = flatten(reply.headers.raw) + reply.content
            results.append((planned, reply.status_code, everything))
    return results


def test_thousands_of_interleaved_requests_each_reach_the_upstream_with_exactly_their_credential(
    gateway_and_upstreams: tuple[Gateway, dict[str, RecordingUpstream]],
) -> None:
    gateway, upstreams = gateway_and_upstreams
    work = plan(seed=5)
    start = threading.Barrier(len(CLIENTS))
    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        futures = [
            pool.submit(run_client, make, gateway.base_url, share, start)
            for make, share in zip(CLIENTS, work, strict=True)
        ]
        results = [result for future in futures for result in future.result()]
    planned = {request.id: request for share in work for request in share}
    assert len(results) == len(planned) == PER_CLIENT * len(CLIENTS)

    # 1. The client side: forwarded requests got 200, the others 401; no secret came back.
    statuses = Counter((p.category, status) for p, status, _ in results)
    assert statuses == Counter(
        (p.category, 200 if p.forwarded() else 401) for p in planned.values()
    )
    assert [p.id for p, _, reply in results if leaks(SECRETS, reply)] == []

    # 2. The upstream side, counted per category: exactly the forwarded requests, once each.
    seen = {
        name: [(request.values("x-test-id")[0].decode(), request) for request in up.requests]
        for name, up in upstreams.items()
    }
    observed = Counter(planned[i].category for name in ROUTES for i, _ in seen[name])
    assert observed == Counter(p.category for p in planned.values() if p.forwarded())
    for name in ROUTES:
        assert all(planned[i].route == name for i, _ in seen[name]), f"{name} got another route's"

    # 3. Every upstream request, one by one: exactly the credential it should carry.
    wrong = []
    for name in ROUTES:
        for request_id, request in seen[name]:
            api_key, authorization = planned[request_id].expected()
            got = (request.values("x-api-key"), request.values("authorization"))
            if got != (api_key, authorization) or request.has("x-gateway-key"):
                wrong.append((planned[request_id], got))
            other = BETA_KEY if name == "alpha" else ALPHA_KEY
            if leaks([other, *GATEWAY_KEYS.values()], flatten(request.headers)):
                wrong.append((planned[request_id], "foreign secret"))
    assert wrong == []
