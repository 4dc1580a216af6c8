"""The route table: one Envoy route per YAML route, plus the fast-path and 404 routes.

For a credential route, requests that carry a client credential of their own
(non-blank, not a placeholder, and no gateway key anywhere) are matched first
by header-matched copies of the route with the processor disabled: they pass
through at Envoy's own cost. Everything else (no credential, blank ones,
placeholders, gateway keys) reaches the processor. A route without a
credential asks the processor only when a gateway key must be checked and
removed. All copies share the YAML route's name, the only thing the processor
trusts to pick a key.
"""

from __future__ import annotations

import json
import re

from extproc.config import errors
from extproc.config.model import (
    KEY_PREFIX,
    METADATA_NAMESPACE,
    STANDARD_SLOTS,
    GatewayConfig,
    Route,
)
from extproc.render import extproc_filter, jwt, local_replies, metering, models
from extproc.render.common import EXTPROC_FILTER, METERING_FILTER, Json, cluster_name, seconds

# Envoy joins repeated headers with ',' before matching. A value with a character
# that is neither white space nor ',' proves some copy is non-blank; for
# Authorization, a scheme word must be followed by such a character ("Bearer "
# alone is blank). Each pattern matches only values the processor would also pass
# through untouched; anything else still goes to the processor, which decides.
NON_BLANK = r".*[^\s,].*"
NON_BLANK_AUTHORIZATION = r"\s*\S+\s+[^\s,].*"
_RETRY_ON = "connect-failure,refused-stream,reset-before-request"


def _match(route: Route) -> Json:
    """The prefix as whole segments: ``/anthropic`` and ``/anthropic/…``, not ``/anthropicx``."""
    segment = route.prefix.rstrip("/")
    return {"path_separated_prefix": segment} if segment else {"prefix": "/"}


def _action(route: Route) -> Json:
    segment = route.prefix.rstrip("/")
    rewrite: Json = (
        {"regex_rewrite": {
            "pattern": {"regex": "^" + re.escape(segment) + "/?"},
            "substitution": route.upstream.path,
        }}
        if segment
        else {"prefix_rewrite": route.upstream.path}
    )  # fmt: skip
    return {
        "cluster": cluster_name(route.envoy_name),
        **rewrite,
        "host_rewrite_literal": route.upstream.authority,
        "timeout": seconds(route.timeout_s),
        "retry_policy": {"retry_on": _RETRY_ON, "num_retries": route.retries},
    }


def _metadata(route: Route, **fields: str) -> Json:
    """The route's error shape for Envoy's own replies, plus ``fields`` for the access log."""
    metadata = local_replies.route_metadata(route.error_style)
    if fields:
        metadata[METADATA_NAMESPACE] = fields
    return {"filter_metadata": metadata}


def _regex(header: str, pattern: str) -> Json:
    return {"name": header, "string_match": {"safe_regex": {"regex": pattern}}}


def _contains(header: str, text: str, invert: bool = False) -> Json:
    """Some copy of ``header`` contains ``text`` (or, inverted, none does, or it is absent).

    A substring test instead of a regular expression: Envoy checks it without RE2, and it
    flags a superset of what a pattern would (``sk-gk-1`` too), which only sends a few
    more requests to the processor, where the decision is made anyway.
    """
    matcher: Json = {"name": header, "string_match": {"contains": text}}
    if invert:
        matcher |= {"invert_match": True, "treat_missing_header_as_empty": True}
    return matcher


def _client_pays(route: Route, no_tokens: list[Json]) -> list[Json]:
    """Header-matched copies of ``route`` that skip the processor.

    Each one needs a filled client credential that contains no placeholder and
    no gateway-key prefix, and no gateway key in any other slot (the processor
    must see and remove those).
    """
    credential = route.credential
    assert credential is not None
    no_keys = [_contains(slot, KEY_PREFIX, invert=True) for slot in credential.slots]
    no_keys += no_tokens  # a person's JWT anywhere: the processor names them
    copies = []
    for header in credential.client_credentials:
        filled = NON_BLANK_AUTHORIZATION if header == "authorization" else NON_BLANK
        matchers = [_regex(header, filled)]
        matchers += [_contains(header, value, invert=True) for value in credential.placeholders]
        copies.append(
            {
                "name": route.envoy_name,
                "match": {**_match(route), "headers": matchers + no_keys},
                "route": _action(route),
                "metadata": _metadata(route, credential_source="client"),
                "typed_per_filter_config": extproc_filter.disabled_for_route(EXTPROC_FILTER),
            }
        )
    return copies


def _keyed(route: Route) -> list[Json]:
    """For a route without a credential: requests carrying a gateway key go to the processor."""
    return [
        {
            "name": route.envoy_name,
            "match": {**_match(route), "headers": [_contains(slot, KEY_PREFIX)]},
            "route": _action(route),
            "metadata": _metadata(route),
            "typed_per_filter_config": extproc_filter.disabled_for_route(METERING_FILTER),
        }
        for slot in STANDARD_SLOTS
    ]


def _routes_for(route: Route, fast_path: bool, no_tokens: list[Json]) -> list[Json]:
    main: Json = {
        "name": route.envoy_name,
        "match": _match(route),
        "route": _action(route),
        "metadata": _metadata(route),
    }
    credential = route.credential
    if credential is None:
        main["typed_per_filter_config"] = extproc_filter.disabled_for_route()
        return [*_keyed(route), main]
    # Only the processor checks gateway keys: a route that demands one for client
    # credentials too, or that does not pass a client's credential, asks it always.
    strict = route.access is not None and route.access.for_client_credentials
    skip = fast_path and not strict and credential.mode.client_passes
    return [*(_client_pays(route, no_tokens) if skip else []), main]


def _not_found() -> Json:
    body = errors.any_style_json("no gateway route matches this path", errors.NOT_FOUND)
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
    body = errors.any_style_json("method TRACE is not allowed", errors.INVALID)
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
    fast, no_tokens = config.extproc.fast_path, jwt.no_token_matchers(config)
    routes = [r for route in config.routes for r in _routes_for(route, fast, no_tokens)]
    if config.metering:
        metering.identity_upstream(routes)
    models.buffer_limits(routes, config)  # allowlists read the model from the body
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
