"""Assemble the Envoy bootstrap from the parts and print it as YAML."""

from __future__ import annotations

import yaml

from extproc.model import GatewayConfig
from extproc.render.clusters import clusters
from extproc.render.common import Json, socket_address
from extproc.render.listener import listener

HEADER = (
    "# Rendered by `python -m extproc render` from {source}.\n"
    "# Do not edit: edit the YAML and render again.\n"
)


def render_bootstrap(config: GatewayConfig) -> Json:
    return {
        "node": {"id": "credential-gateway", "cluster": "credential-gateway"},
        "admin": {"address": socket_address(config.admin.address, config.admin.port)},
        "static_resources": {"listeners": [listener(config)], "clusters": clusters(config)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50000,
                    },
                }
            ]
        },
    }


def render_yaml(config: GatewayConfig) -> str:
    body = yaml.safe_dump(render_bootstrap(config), sort_keys=False, width=120)
    return HEADER.format(source=config.source.name) + body
