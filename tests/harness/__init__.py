"""Reusable pieces for the end-to-end tests: ports, a recording upstream, the gateway, clients.

Everything here runs real processes on 127.0.0.1 with ports picked at run
time, so the suite can run twice at once on one machine.

Typical use (fixtures from ``tests/conftest.py``)::

    def test_x(start_gateway, upstream):
        gateway = start_gateway([credential_route("anthropic", upstream.url())],
                                env={"ANTHROPIC_KEY": "k"})           # env = processor's whole env
        with http1(gateway.base_url) as client:
            client.get("/anthropic/v1/models")
        assert upstream.only_request().values("x-api-key") == [b"k"]

For later tests: ``gateway.reconfigure(routes)`` rewrites the YAML in place
(live reload); ``gateway.stop_extproc()`` / ``gateway.start_extproc()`` kill and
restart the processor on the same port; ``gateway.access_log()`` and
``wait_access_log()`` read Envoy's JSON access log; ``RecordingUpstream(responder=...)``
answers anything (``Reply``), and its ``/redirect`` and ``/status/NNN`` paths
answer 3xx and chosen statuses; ``raw_request`` / ``raw_h2_request`` send bytes
that httpx would refuse; ``make_certs`` makes a trustme CA and certificate files.

Beside these: ``harness.shared`` starts one gateway a test module shares
(``one_upstream_gateway``, ``running_upstreams``); ``harness.messages`` builds
ext_proc messages for the tests that drive the processor without Envoy.
"""

from harness.clients import (
    H2Result,
    RawResponse,
    http1,
    http2,
    raw_h2_request,
    raw_request,
    sse_events,
)
from harness.gateway import (
    FAST_PATH_IDS,
    FAST_PATH_MODES,
    Gateway,
    GatewayStartError,
    base_env,
    credential_route,
    env_name,
    run_serve,
)
from harness.ports import free_port
from harness.tls import CertFiles, make_certs
from harness.upstream import RecordedRequest, RecordingUpstream, Reply, sse_event

__all__ = [
    "FAST_PATH_IDS",
    "FAST_PATH_MODES",
    "CertFiles",
    "Gateway",
    "GatewayStartError",
    "H2Result",
    "RawResponse",
    "RecordedRequest",
    "RecordingUpstream",
    "Reply",
    "base_env",
    "credential_route",
    "env_name",
    "free_port",
    "http1",
    "http2",
    "make_certs",
    "raw_h2_request",
    "raw_request",
    "run_serve",
    "sse_event",
    "sse_events",
]
