"""The ext_proc HTTP filter: ask the processor about request headers, nothing else.

Bodies, responses and trailers never go to the processor (SKIP/NONE), so
streaming is untouched and the processor's stream ends after one answer.
"""

from __future__ import annotations

import re

from extproc.config.model import (
    METADATA_NAMESPACE,
    STANDARD_SLOTS,
    FailureMode,
    GatewayConfig,
)
from extproc.render import jwt, metering
from extproc.render.common import (
    EXTPROC_CLUSTER,
    EXTPROC_FILTER,
    METERING_FILTER,
    Json,
    seconds,
    typed,
)

_EXT_PROC = "envoy.extensions.filters.http.ext_proc.v3."


def mutation_rules(config: GatewayConfig) -> Json:
    """The processor may set or remove only credential and gateway-key slots (and ``retry-after``
    on its own 429s, with limits or budgets); anything else fails.

    ``x-envoy-*``, ``host``/``:authority``, ``:path``, ``:scheme`` and ``:method``
    are already out of reach by default; ``disallow_all`` plus an allow-list makes
    every other header out of reach too, and ``disallow_is_error`` turns an
    attempt into a failed request instead of a silently ignored change.
    """
    refuses = config.limits is not None or config.spend is not None  # 429s with retry-after
    names = sorted(_slots(config) | ({"retry-after"} if refuses else set()))
    return {
        "disallow_system": True,
        "disallow_all": True,
        "allow_expression": {"regex": "^(" + "|".join(re.escape(n) for n in names) + ")$"},
        "disallow_is_error": True,
    }


def _slots(config: GatewayConfig) -> set[str]:
    """Every header a client credential or a gateway key may arrive in, on any route."""
    slots = (r.credential.slots if r.credential else STANDARD_SLOTS for r in config.routes)
    return {header for route_slots in slots for header in route_slots}


def forward_rules(config: GatewayConfig) -> Json:
    """Send the processor only the headers it decides on: credentials and gateway keys.

    Everything else (cookies, prompts' metadata, user agents) never leaves Envoy,
    and the processor parses a few headers instead of dozens.
    """
    names = _slots(config) | {r.access.header for r in config.routes if r.access}
    patterns = [{"exact": name, "ignore_case": True} for name in sorted(names)]
    return {"allowed_headers": {"patterns": patterns}}


def _metadata_options(config: GatewayConfig) -> Json:
    """The processor writes its own namespace; with SSO it reads the verified JWT payloads."""
    options: Json = {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}}
    if config.sso is not None:
        options["forwarding_namespaces"] = {"untyped": [jwt.NAMESPACE]}
    return options


def http_filter(config: GatewayConfig) -> Json:
    settings = config.extproc
    timeout = seconds(settings.timeout_ms / 1000)
    filter_config = typed(
        _EXT_PROC + "ExternalProcessor",
        grpc_service={"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": timeout},
        failure_mode_allow=settings.failure_mode is FailureMode.OPEN,
        # Processor unreachable: 503 (retryable) rather than Envoy's default 500.
        status_on_error={"code": 503},
        processing_mode={
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        # The route Envoy matched, so the processor never trusts Host or :path to pick a key.
        request_attributes=["xds.route_name"],
        message_timeout=timeout,
        # The route was chosen before the credential was set and must stay chosen.
        route_cache_action="RETAIN",
        allow_mode_override=False,
        mutation_rules=mutation_rules(config),
        forward_rules=forward_rules(config),
        metadata_options=_metadata_options(config),
    )
    return {"name": EXTPROC_FILTER, "typed_config": filter_config}


def disabled_for_route(*filters: str) -> Json:
    """``typed_per_filter_config`` that turns ``filters`` (default: the decision and the
    metering filters) off for one route."""
    names = filters or (EXTPROC_FILTER, METERING_FILTER)
    return {
        name: metering.disabled()
        if name == METERING_FILTER
        else typed(_EXT_PROC + "ExtProcPerRoute", disabled=True)
        for name in names
    }
