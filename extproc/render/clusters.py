"""One cluster per route (its upstream) plus the processor's cluster."""

from __future__ import annotations

from pathlib import Path

from extproc.config.model import GatewayConfig, Route
from extproc.render import jwt, tls
from extproc.render.common import (
    ACCESSLOG_CLUSTER,
    EXTPROC_CLUSTER,
    HTTP_OPTIONS,
    Json,
    cluster_name,
    is_ip,
    seconds,
    socket_address,
    typed,
)

# Generous enough for many concurrent SSE streams; Envoy's default (1024) is tight.
_THRESHOLDS = {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}


def _endpoint(name: str, address: Json) -> Json:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }


def route_cluster(
    route: Route, config: GatewayConfig, sds_source: tls.SecretSource | None = None
) -> Json:
    """The route's upstream; with ``sds_source`` its CA bundle comes by SDS (watched on disk)."""
    name = cluster_name(route.envoy_name)
    target = route.upstream
    cluster: Json = {
        "name": name,
        "type": "STATIC" if is_ip(target.host) else "LOGICAL_DNS",
        "connect_timeout": seconds(route.connect_timeout_s),
        "load_assignment": _endpoint(name, socket_address(target.host, target.port)),
        "circuit_breakers": {"thresholds": [_THRESHOLDS]},
    }
    if not is_ip(target.host):
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    protocol: Json
    if target.tls:
        # ALPN picks HTTP/2 when the provider offers it, HTTP/1.1 otherwise.
        protocol = {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}
        cluster["transport_socket"] = tls.upstream(target, _ca_file(route, config), sds_source)
    else:
        protocol = {"explicit_http_config": {"http_protocol_options": {}}}
    cluster["typed_extension_protocol_options"] = {HTTP_OPTIONS: typed(HTTP_OPTIONS, **protocol)}
    return cluster


def extproc_cluster(config: GatewayConfig, name: str = EXTPROC_CLUSTER) -> Json:
    """The processor speaks gRPC, so HTTP/2 must be configured explicitly."""
    settings = config.extproc
    if settings.socket is not None:
        address: Json = {"pipe": {"path": str(settings.socket)}}
        kind = "STATIC"
    else:
        address = socket_address(settings.address, settings.port)
        kind = "STATIC" if is_ip(settings.address) else "LOGICAL_DNS"
    return {
        "name": name,
        "type": kind,
        "connect_timeout": "1s",
        "load_assignment": _endpoint(name, address),
        "circuit_breakers": {"thresholds": [_THRESHOLDS]},
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: typed(HTTP_OPTIONS, explicit_http_config={"http2_protocol_options": {}})
        },
    }


def _ca_file(route: Route, config: GatewayConfig) -> Path:
    return route.ca_file or config.system_ca_file


def ca_files(config: GatewayConfig) -> dict[str, Path]:
    """The CA bundle each TLS route's cluster trusts, by cluster name (the SDS secrets it needs)."""
    return {
        cluster_name(route.envoy_name): _ca_file(route, config)
        for route in config.routes
        if route.upstream.tls
    }


def clusters(config: GatewayConfig, sds_source: tls.SecretSource | None = None) -> list[Json]:
    out = [route_cluster(route, config, sds_source) for route in config.routes]
    out.append(extproc_cluster(config))  # any route may have a gateway key to check
    if config.metering:  # the access-log service, on the same processor
        out.append(extproc_cluster(config, ACCESSLOG_CLUSTER))
    if (keys := jwt.jwks_cluster(config)) is not None:  # the OpenID provider's keys
        out.append(keys)
    return out
