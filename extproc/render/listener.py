"""The gateway listener: HTTP connection manager, edge hardening, access log, JSON errors.

Hardening follows Envoy's edge guide where it fits an API gateway: the client
address comes from the connection (``use_remote_address``), header names with
underscores are rejected (``x_api_key`` must not slip past a check for
``x-api-key``), paths are normalised before routing so ``/a/../b`` cannot
borrow another prefix's route, and header sizes and HTTP/2 streams are bounded.
Timeouts leave long SSE responses alone: only idle streams are cut.
"""

from __future__ import annotations

from extproc.config.model import METADATA_NAMESPACE, GatewayConfig
from extproc.render import extproc_filter, jwt, local_replies, metering, models, routes, tls
from extproc.render.common import Json, seconds, socket_address, typed

_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%",
    "route": "%ROUTE_NAME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "credential_source": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:credential_source)%",
    "outcome": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:outcome)%",
    "client": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:client)%",
    "fast_path": f"%METADATA(ROUTE:{METADATA_NAMESPACE}:credential_source)%",
    "duration_ms": "%DURATION%",
    "upstream_ms": "%RESPONSE_DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "upstream_host": "%UPSTREAM_HOST%",
    "downstream": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


def _access_log(config: GatewayConfig) -> list[Json]:
    """The JSON line on stdout (with the token counts when metering), and with metering the
    gRPC entry for the processor."""
    fields = ACCESS_LOG_FIELDS | (metering.USAGE_LOG_FIELDS if config.metering else {})
    fmt = {
        "json_format": fields,
        "formatters": [
            {
                "name": "envoy.formatter.req_without_query",
                "typed_config": typed(
                    "envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"
                ),
            }
        ],
    }
    # Who paid: the processor's answer says so; where Envoy skipped the processor (the fast
    # path) the route does. Two loggers, one per case (a metadata lookup each), one line each.
    skipped = fmt | {"json_format": fields | {"credential_source": _ROUTE_SOURCE}}
    stdout = [_stdout(fmt, _source_filter(decided=True)), _stdout(skipped, _source_filter(False))]
    return [*stdout, metering.grpc_access_log(config)] if config.metering else stdout


_ROUTE_SOURCE = f"%METADATA(ROUTE:{METADATA_NAMESPACE}:credential_source)%"


def _stdout(fmt: Json, only: Json) -> Json:
    return {
        "name": "envoy.access_loggers.stdout",
        "filter": only,
        "typed_config": typed(
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", log_format=fmt
        ),
    }


def _source_filter(decided: bool) -> Json:
    """Requests whose dynamic metadata has a ``credential_source`` (or, not ``decided``, none).

    The filter compares a present value with ``value`` (the matcher's ``invert`` is not
    read there): no string is null, so ``null_match`` takes only the absent key.
    """
    value: Json = {"present_match": True} if decided else {"null_match": {}}
    path = [{"key": "credential_source"}]
    return {
        "metadata_filter": {
            "matcher": {"filter": METADATA_NAMESPACE, "path": path, "value": value},
            "match_if_key_not_found": not decided,
        }
    }


def _local_replies(config: GatewayConfig) -> Json:
    """Envoy's own answers; with SSO, refused tokens and models first."""
    return models.local_replies(jwt.local_replies(local_replies.config(), config), config)


def connection_manager(config: GatewayConfig, rds_source: Json | None = None) -> Json:
    """The HCM; routes inline, or from ``rds_source`` (a file Envoy watches) when given."""
    listener = config.listener
    # The decision filter is always there: any route may have a gateway key to check.
    people = jwt.http_filter(config)  # people's JWTs, checked before the processor decides
    filters = [*([people] if people else []), extproc_filter.http_filter(config)]
    filters += models.http_filters(config)  # after the decision: it names the client's teams
    if config.metering:  # on the response path, next to the router: counts what it sends
        filters.append(metering.lua_filter())
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
        }
    )
    return typed(
        _HCM,
        stat_prefix="gateway",
        codec_type="AUTO",
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="UNESCAPE_AND_REDIRECT",
        common_http_protocol_options={
            "headers_with_underscores_action": "REJECT_REQUEST",
            "idle_timeout": "3600s",
        },
        http2_protocol_options={
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        max_request_headers_kb=listener.max_request_headers_kb,
        stream_idle_timeout=seconds(listener.stream_idle_timeout_s),
        request_headers_timeout="10s",
        access_log=_access_log(config),
        local_reply_config=_local_replies(config),
        http_filters=filters,
        **(
            {"rds": {"route_config_name": "gateway", "config_source": rds_source}}
            if rds_source
            else {"route_config": routes.route_config(config)}
        ),
    )


def listener(
    config: GatewayConfig, rds_source: Json | None = None, sds_source: Json | None = None
) -> Json:
    hcm = connection_manager(config, rds_source)
    chain: Json = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if config.listener.tls is not None:
        chain["transport_socket"] = tls.downstream(config.listener.tls, sds_source)
    return {
        "name": "gateway",
        # /drain_listeners?inboundonly (used by `up` on SIGTERM) drains only INBOUND listeners.
        "traffic_direction": "INBOUND",
        "address": socket_address(config.listener.address, config.listener.port),
        # The port is this gateway's alone: a second Envoy on it fails instead of splitting
        # clients with us (SO_REUSEPORT, Envoy's default on Linux).
        "enable_reuse_port": False,
        "per_connection_buffer_limit_bytes": 32768,
        "filter_chains": [chain],
    }
