"""The listener's certificate and the upstreams' CA bundles by file-based SDS under ``up`` /
``serve --xds-dir`` (so a rotation on disk reaches new connections), inline in a one-shot
``render``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trustme
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401 (registers Cluster)
from envoy.extensions.transport_sockets.tls.v3 import (
    secret_pb2,  # noqa: F401 (registers Secret)
    tls_pb2,  # noqa: F401 (UpstreamTlsContext)
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig
from extproc.render.bootstrap import render_bootstrap
from extproc.render.common import cluster_name
from extproc.runtime.xds import XdsWriter


def tls_config(folder: Path) -> GatewayConfig:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    (folder / "certs").mkdir()
    leaf.cert_chain_pems[0].write_to_path(str(folder / "certs" / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(folder / "certs" / "key.pem"))
    (folder / "gateway.yaml").write_text(
        "listener: {address: 127.0.0.1, port: 4443, "
        "tls: {cert_file: certs/cert.pem, key_file: certs/key.pem}}\n"
        "routes:\n  - {name: local, prefix: /local/, upstream: 'http://127.0.0.1:9000'}\n"
    )
    return load_config(folder / "gateway.yaml")


def read(xds: Path, name: str) -> Any:
    return json.loads((xds / name).read_text())


def test_the_dynamic_listener_takes_its_certificate_from_a_watched_sds_file(
    tmp_path: Path,
) -> None:
    config = tls_config(tmp_path)
    xds = tmp_path / "xds"
    XdsWriter(xds).write(config)
    document = read(xds, "sds.json")
    json_format.ParseDict(document, discovery_pb2.DiscoveryResponse())  # a Secret Envoy reads
    (secret,) = document["resources"]
    assert secret["name"] == "listener-certificate"
    assert secret["tls_certificate"] == {
        "certificate_chain": {"filename": str(tmp_path / "certs" / "cert.pem")},
        "private_key": {"filename": str(tmp_path / "certs" / "key.pem")},
        "watched_directory": {"path": str(tmp_path / "certs")},
    }
    (listener,) = read(xds, "lds.json")["resources"]
    context = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    (sds,) = context["common_tls_context"]["tls_certificate_sds_secret_configs"]
    assert sds["name"] == "listener-certificate"
    assert sds["sds_config"]["path_config_source"]["path"] == str(xds / "sds.json")
    assert "tls_certificates" not in context["common_tls_context"]


def test_a_static_render_keeps_the_certificate_inline(tmp_path: Path) -> None:
    bootstrap = render_bootstrap(tls_config(tmp_path))
    (listener,) = bootstrap["static_resources"]["listeners"]
    context = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert context["common_tls_context"]["tls_certificates"][0]["private_key"] == {
        "filename": str(tmp_path / "certs" / "key.pem")
    }


def upstream_config(folder: Path, *routes: tuple[str, str | None]) -> GatewayConfig:
    """Routes (name, ca_file or None for the ca_bundle) to https upstreams; bundles made here."""
    for name in ("ca1.pem", "ca2.pem", "system.pem"):
        if not (folder / name).exists():
            trustme.CA().cert_pem.write_to_path(str(folder / name))
    lines = [
        f"  - {{name: {name}, prefix: /{name}/, upstream: 'https://{name}.example:443'"
        + (f", ca_file: {ca}}}" if ca else "}")
        for name, ca in routes
    ]
    (folder / "gateway.yaml").write_text(
        "listener: {address: 127.0.0.1, port: 4000}\nca_bundle: system.pem\nroutes:\n"
        + "\n".join(lines)
        + "\n"
    )
    return load_config(folder / "gateway.yaml")


def validation(cluster: Any) -> Any:
    return cluster["transport_socket"]["typed_config"]["common_tls_context"]


def by_name(document: Any) -> dict[str, Any]:
    return {resource["name"]: resource for resource in document["resources"]}


def bundles(xds: Path) -> dict[str, Any]:
    """The CA bundles' SDS files: exactly one secret each (all Envoy takes from a file)."""
    found = {}
    for path in sorted(xds.glob("upstream-ca-*.json")):
        document = json.loads(path.read_text())
        json_format.ParseDict(document, discovery_pb2.DiscoveryResponse())  # a Secret Envoy reads
        (secret,) = document["resources"]
        assert path.name == secret["name"] + ".json"
        found[secret["name"]] = secret["validation_context"]
    return found


def bundle_config(cluster: Any) -> Any:
    """The cluster's SDS reference to its CA bundle."""
    combined = validation(cluster)["combined_validation_context"]
    return combined["validation_context_sds_secret_config"]


def test_a_dynamic_upstream_trusts_its_ca_bundle_by_a_watched_sds_secret(tmp_path: Path) -> None:
    config = upstream_config(tmp_path, ("alpha", "ca1.pem"), ("beta", None), ("gamma", None))
    xds = tmp_path / "xds"
    XdsWriter(xds).write(config)
    clusters_file = read(xds, "cds.json")
    json_format.ParseDict(clusters_file, discovery_pb2.DiscoveryResponse())  # Envoy's schema
    secrets = bundles(xds)
    assert len(secrets) == 2  # one per bundle: beta and gamma share the system one
    trusted = {}
    for route in config.routes:
        context = validation(by_name(clusters_file)[cluster_name(route.envoy_name)])
        assert "validation_context" not in context
        combined = context["combined_validation_context"]
        assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": f"{route.name}.example"}}
        ]
        sds = combined["validation_context_sds_secret_config"]
        source = sds["sds_config"]["path_config_source"]
        assert source == {
            "path": str(xds / f"{sds['name']}.json"),
            "watched_directory": {"path": str(xds)},
        }
        trusted[route.name] = secrets[sds["name"]]
    assert trusted["alpha"] == {
        "trusted_ca": {"filename": str(tmp_path / "ca1.pem")},
        "watched_directory": {"path": str(tmp_path)},
    }
    assert trusted["beta"] == trusted["gamma"]
    assert trusted["beta"]["trusted_ca"] == {"filename": str(tmp_path / "system.pem")}


def test_a_kept_cluster_is_rendered_as_before_and_keeps_its_bundle_while_it_is_kept(
    tmp_path: Path,
) -> None:
    xds = tmp_path / "xds"
    writer = XdsWriter(xds)
    writer.write(upstream_config(tmp_path, ("alpha", "ca1.pem")))
    (old,) = [c for c in read(xds, "cds.json")["resources"] if "transport_socket" in c]
    writer.write(upstream_config(tmp_path, ("alpha", "ca2.pem")))  # a new route name
    assert by_name(read(xds, "cds.json"))[old["name"]] == old  # as it was: Envoy keeps it
    assert bundle_config(old)["name"] in bundles(xds)
    writer.write(upstream_config(tmp_path, ("alpha", "system.pem")))
    assert old["name"] not in by_name(read(xds, "cds.json"))
    secrets = bundles(xds)  # the first bundle's file is gone with the last cluster naming it
    assert bundle_config(old)["name"] not in secrets
    kept = [secret["trusted_ca"]["filename"] for secret in secrets.values()]
    assert sorted(kept) == [str(tmp_path / "ca2.pem"), str(tmp_path / "system.pem")]


def test_a_static_render_keeps_the_ca_bundle_inline(tmp_path: Path) -> None:
    bootstrap = render_bootstrap(upstream_config(tmp_path, ("alpha", "ca1.pem")))
    (cluster, *_) = bootstrap["static_resources"]["clusters"]
    context = validation(cluster)["validation_context"]
    assert context["trusted_ca"] == {"filename": str(tmp_path / "ca1.pem")}


def test_a_bundle_file_is_written_once_not_moved_again_on_every_reload(tmp_path: Path) -> None:
    """Each move in the xDS folder makes Envoy re-read every file it watches there."""
    xds = tmp_path / "xds"
    writer = XdsWriter(xds)
    writer.write(upstream_config(tmp_path, ("alpha", "ca1.pem")))
    (bundle,) = xds.glob("upstream-ca-*.json")
    first = bundle.stat().st_ino
    writer.write(upstream_config(tmp_path, ("alpha", "ca1.pem"), ("beta", None)))
    assert bundle.stat().st_ino == first
