"""ext_proc messages as Envoy sends them, for tests that drive the processor without Envoy.

The processor finds the route in the request's attributes (``ROUTE_ATTRIBUTE``
under ``ATTRIBUTES_KEY``, as the rendered ext_proc filter asks Envoy to send)
and reads header values from ``raw_value`` (Envoy sends every value there), so
a test message must carry both in the same places to be a fair stand-in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.config.load import load_config
from extproc.policy.compiled import Policy, compile_policy
from extproc.policy.processor import ATTRIBUTES_KEY, ROUTE_ATTRIBUTE

Headers = Iterable[tuple[str, bytes]]

TWO_ROUTES = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - name: paid
    prefix: /paid/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: KEY}}
  - name: unpaid
    prefix: /unpaid/
    upstream: https://api.anthropic.com
    credential: {header: x-api-key, secret: {env: ABSENT, optional: true}}
"""


@dataclass
class FixedPolicy:
    """A policy source that never reloads: the servicer reads ``.policy`` on every call."""

    policy: Policy


def two_route_policy(folder: Path) -> tuple[FixedPolicy, dict[str, str]]:
    """The policy of ``TWO_ROUTES``, and each route's Envoy name by its YAML name.

    ``paid`` injects ``x-api-key: server-key``; ``unpaid``'s optional secret is
    never set, so a request without a credential there is answered 401.
    """
    (folder / "gateway.yaml").write_text(TWO_ROUTES)
    config = load_config(folder / "gateway.yaml")
    names = {route.name: route.envoy_name for route in config.routes}
    return FixedPolicy(compile_policy(config, {"KEY": "server-key"})), names


def header_map(headers: Headers) -> base_pb2.HeaderMap:
    """Headers in order, names as given, every value in ``raw_value``."""
    values = [base_pb2.HeaderValue(key=name, raw_value=value) for name, value in headers]
    return base_pb2.HeaderMap(headers=values)


def headers_request(route: str, headers: Headers = ()) -> pb.ProcessingRequest:
    """A request-headers message for the Envoy route named ``route``, through the wire and back.

    The round trip through the wire format means the processor gets a parsed
    message, as from Envoy, not the object the test built.
    """
    attributes = struct_pb2.Struct()
    attributes.update({ROUTE_ATTRIBUTE: route})
    message = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=header_map(headers)),
        attributes={ATTRIBUTES_KEY: attributes},
    )
    return pb.ProcessingRequest.FromString(message.SerializeToString())
