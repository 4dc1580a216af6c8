"""Small builders shared by the render modules."""

from __future__ import annotations

import ipaddress
from typing import Any

Json = dict[str, Any]
TYPE_PREFIX = "type.googleapis.com/"


def typed(type_name: str, **fields: Any) -> Json:
    """An ``Any``-typed config block: ``{"@type": ..., **fields}``."""
    return {"@type": TYPE_PREFIX + type_name, **fields}


def socket_address(address: str, port: int) -> Json:
    return {"socket_address": {"address": address, "port_value": port}}


def is_ip(host: str) -> bool:
    """An IP literal (a STATIC endpoint, an IP SAN) rather than a DNS name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def seconds(value: float) -> str:
    """A protobuf Duration in its JSON/YAML form."""
    return f"{value:g}s"


def cluster_name(route_name: str) -> str:
    return f"route_{route_name}"


EXTPROC_CLUSTER = "extproc"
# The access-log service's own cluster (same processor): its long-lived streams never
# take the decisions' circuit-breaker slots.
ACCESSLOG_CLUSTER = "extproc_accesslog"
EXTPROC_FILTER = "envoy.filters.http.ext_proc"
METERING_FILTER = "credential_gateway.metering"  # the Lua filter counting usage
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
