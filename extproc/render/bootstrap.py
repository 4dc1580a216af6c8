"""Assemble the Envoy bootstrap, static or with file-based dynamic resources.

Static: everything inline, for a one-shot ``render``. Dynamic (``xds_dir``):
the bootstrap only names files in that folder (listeners, routes, clusters,
the listener's certificate and each CA bundle by SDS), which Envoy watches; ``extproc.runtime.xds``
rewrites them atomically on every good config load, so routes and upstreams change
without a restart and without dropping connections (route changes do not touch the
listener).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import yaml

from extproc.config.model import GatewayConfig
from extproc.render import tls
from extproc.render.clusters import ca_files as ca_files_by_cluster
from extproc.render.clusters import clusters
from extproc.render.common import Json, socket_address, typed
from extproc.render.listener import listener
from extproc.render.routes import route_config

# libyaml's emitter when PyYAML has it: xDS files for many routes are megabytes.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

HEADER = (
    "# Rendered by `python -m extproc render` from {source}.\n"
    "# Do not edit: edit the YAML and render again.\n"
)
# JSON, not YAML: machine-read files of megabytes for many routes, which Python writes
# and Envoy parses several times faster as JSON (1,000 routes: ~2 s less per change).
RESOURCE_FILES = {"sds": "sds.json", "cds": "cds.json", "rds": "rds.json", "lds": "lds.json"}
_TYPES = {
    "sds": "envoy.extensions.transport_sockets.tls.v3.Secret",
    "cds": "envoy.config.cluster.v3.Cluster",
    "rds": "envoy.config.route.v3.RouteConfiguration",
    "lds": "envoy.config.listener.v3.Listener",
}


def file_source(xds_dir: Path, kind: str) -> Json:
    """A config source that reads ``kind``'s file and reloads when a file is moved in."""
    return _path_source(xds_dir / RESOURCE_FILES[kind], xds_dir)


def secret_file(name: str) -> str:
    """The file of a CA bundle's SDS resource: one each, as Envoy reads one secret per file."""
    return f"{name}.json"


def secret_source(xds_dir: Path) -> tls.SecretSource:
    """Where dynamic clusters read their CA bundles' secrets (a file each in ``xds_dir``)."""
    return lambda name: _path_source(xds_dir / secret_file(name), xds_dir)


def _path_source(path: Path, xds_dir: Path) -> Json:
    return {
        "resource_api_version": "V3",
        "path_config_source": {"path": str(path), "watched_directory": {"path": str(xds_dir)}},
    }


def _overload_manager() -> Json:
    monitor = typed(
        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
        max_active_downstream_connections=50000,
    )
    name = "envoy.resource_monitors.global_downstream_max_connections"
    return {"resource_monitors": [{"name": name, "typed_config": monitor}]}


def render_bootstrap(config: GatewayConfig, xds_dir: Path | None = None) -> Json:
    bootstrap: Json = {
        "node": {"id": "credential-gateway", "cluster": "credential-gateway"},
        "admin": {"address": socket_address(config.admin.address, config.admin.port)},
    }
    if xds_dir is None:
        bootstrap["static_resources"] = {
            "listeners": [listener(config)],
            "clusters": clusters(config),
        }
    else:
        bootstrap["dynamic_resources"] = {
            "lds_config": file_source(xds_dir, "lds"),
            "cds_config": file_source(xds_dir, "cds"),
        }
    bootstrap["overload_manager"] = _overload_manager()
    return bootstrap


def render_resources(
    config: GatewayConfig, xds_dir: Path, extra_clusters: list[Json]
) -> dict[str, Json]:
    """The discovery files for ``xds_dir``, by kind (sds: the listener's certificate)."""
    found = {
        "cds": clusters(config, secret_source(xds_dir)) + extra_clusters,
        "rds": [route_config(config)],
        "sds": tls.secrets(config.listener.tls),
        "lds": [
            listener(
                config,
                rds_source=file_source(xds_dir, "rds"),
                sds_source=file_source(xds_dir, "sds"),
            )
        ],
    }
    return {kind: _document(kind, items) for kind, items in found.items()}


def render_bundles(config: GatewayConfig, extra_ca_files: Collection[Path]) -> dict[str, Json]:
    """The CA bundles' SDS files, by file name: the routes' and ``extra_ca_files`` (those of
    clusters kept from the last config, which still name them)."""
    bundles = {*ca_files_by_cluster(config).values(), *extra_ca_files}
    return {
        secret_file(tls.ca_secret_name(path)): _document("sds", [tls.ca_secret(path)])
        for path in sorted(bundles)
    }


def _document(kind: str, items: list[Json]) -> Json:
    return {"resources": [{"@type": "type.googleapis.com/" + _TYPES[kind], **r} for r in items]}


def to_yaml(document: Json, source: Path) -> str:
    text = yaml.dump(document, Dumper=_DUMPER, sort_keys=False, width=120)
    return HEADER.format(source=source.name) + text


def to_json(document: Json) -> str:
    """An xDS file: compact JSON (python -m json.tool shows it to a person)."""
    return json.dumps(document, separators=(",", ":")) + "\n"


def render_yaml(config: GatewayConfig, xds_dir: Path | None = None) -> str:
    return to_yaml(render_bootstrap(config, xds_dir), config.source)
