"""The route table: one Envoy route per YAML route, plus the fast-path and 404 routes.

For a credential route, requests that carry a non-blank client credential are
matched first by header-matched copies of the route with the processor
disabled: they pass through at Envoy's own cost. Everything else (no
credential, blank ones) reaches the processor. Both copies share the YAML
route's name, the only thing the processor trusts to pick a key.
"""

from __future__ import annotations

import json

from extproc.config.model import METADATA_NAMESPACE, GatewayConfig, Route
from extproc.render import extproc_filter
from extproc.render.common import Json, cluster_name, seconds

# Envoy joins repeated headers with ',' before matching. A value with a character
# that is neither white space nor ',' proves some copy is non-blank; for
# Authorization, a scheme word must be followed by such a character ("Bearer "
# alone is blank). Each pattern matches only values the processor would also pass
# through untouched; anything else still goes to the processor, which decides.
NON_BLANK = r".*[^\s,].*"
NON_BLANK_AUTHORIZATION = r"\s*\S+\s+[^\s,].*"
_RETRY_ON = "connect-failure,refused-stream,reset-before-request"


def _action(route: Route) -> Json:
    return {
        "cluster": cluster_name(route.envoy_name),
        "prefix_rewrite": route.upstream.path,
        "host_rewrite_literal": route.upstream.authority,
        "timeout": seconds(route.timeout_s),
        "retry_policy": {"retry_on": _RETRY_ON, "num_retries": route.retries},
    }


def _client_pays(route: Route) -> list[Json]:
    """Header-matched copies of ``route`` that skip the processor."""
    assert route.credential is not None
    return [
        {
            "name": route.envoy_name,
            "match": {
                "prefix": route.prefix,
                "headers": [{"name": header, "string_match": {"safe_regex": {"regex": pattern}}}],
            },
            "route": _action(route),
            "metadata": {"filter_metadata": {METADATA_NAMESPACE: {"credential_source": "client"}}},
            "typed_per_filter_config": extproc_filter.disabled_for_route(),
        }
        for header in route.credential.client_credentials
        for pattern in [NON_BLANK_AUTHORIZATION if header == "authorization" else NON_BLANK]
    ]


def _routes_for(route: Route, fast_path: bool) -> list[Json]:
    main: Json = {
        "name": route.envoy_name,
        "match": {"prefix": route.prefix},
        "route": _action(route),
    }
    if route.credential is None:
        main["typed_per_filter_config"] = extproc_filter.disabled_for_route()
        return [main]
    # Only the processor checks gateway keys: a route that demands one for client
    # credentials too must send those requests to it.
    strict = route.access is not None and route.access.for_client_credentials
    return [*(_client_pays(route) if fast_path and not strict else []), main]


def _not_found() -> Json:
    body = {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no gateway route matches this path"},
    }
    return {
        "name": "not_found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": json.dumps(body)}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}}
        ],
        "typed_per_filter_config": extproc_filter.disabled_for_route(),
    }


def _no_trace() -> Json:
    """TRACE asks the origin to echo the request, injected key included: never forwarded."""
    message = "method TRACE is not allowed"
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return {
        "name": "no_trace",
        "match": {
            "prefix": "/",
            "headers": [{"name": ":method", "string_match": {"exact": "TRACE"}}],
        },
        "direct_response": {"status": 405, "body": {"inline_string": json.dumps(body)}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}}
        ],
        "typed_per_filter_config": extproc_filter.disabled_for_route(),
    }


def route_config(config: GatewayConfig) -> Json:
    routes = [r for route in config.routes for r in _routes_for(route, config.extproc.fast_path)]
    table: Json = {
        "name": "gateway",
        "virtual_hosts": [
            {"name": "gateway", "domains": ["*"], "routes": [_no_trace(), *routes, _not_found()]}
        ],
    }
    # Gateway keys are for this gateway only: no upstream ever sees one, on any route.
    key_headers = sorted({route.access.header for route in config.routes if route.access})
    if key_headers:
        table["request_headers_to_remove"] = key_headers
    return table
