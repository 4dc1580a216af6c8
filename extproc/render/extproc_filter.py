"""The ext_proc HTTP filter: ask the processor about request headers, nothing else.

Bodies, responses and trailers never go to the processor (SKIP/NONE), so
streaming is untouched and the processor's stream ends after one answer.
"""

from __future__ import annotations

from extproc.model import ExtprocSettings, FailureMode
from extproc.render.common import EXTPROC_CLUSTER, EXTPROC_FILTER, Json, seconds, typed
from extproc.responses import METADATA_NAMESPACE

_EXT_PROC = "envoy.extensions.filters.http.ext_proc.v3."


def http_filter(settings: ExtprocSettings) -> Json:
    timeout = seconds(settings.timeout_ms / 1000)
    config = typed(
        _EXT_PROC + "ExternalProcessor",
        grpc_service={"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": timeout},
        failure_mode_allow=settings.failure_mode is FailureMode.OPEN,
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
        mutation_rules={"disallow_system": True, "disallow_is_error": True},
        metadata_options={"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
    )
    return {"name": EXTPROC_FILTER, "typed_config": config}


def disabled_for_route() -> Json:
    """``typed_per_filter_config`` that turns the processor off for one route."""
    return {EXTPROC_FILTER: typed(_EXT_PROC + "ExtProcPerRoute", disabled=True)}
