"""The listener's certificate by file-based SDS under ``up`` / ``serve --xds-dir`` (so a rotation
on disk reaches new connections), inline in a one-shot ``render``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trustme
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # noqa: F401 (registers Secret)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from extproc.config.load import load_config
from extproc.config.model import GatewayConfig
from extproc.render.bootstrap import render_bootstrap
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
