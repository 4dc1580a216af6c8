"""Rendered Envoy configs: golden files under envoy/, and Envoy itself accepts them.

Regenerate after a deliberate change with ``make golden`` (UPDATE_GOLDEN=1).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import trustme
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from extproc.config.load import load_config
from extproc.render import render_yaml
from extproc.runtime.processes import find_envoy
from extproc.runtime.xds import XdsWriter

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def envoy_validate(bootstrap: Path) -> None:
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(bootstrap), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_rendered_example_matches_its_golden_file(example: Path) -> None:
    golden = ROOT / "envoy" / example.name
    text = render_yaml(load_config(example))
    if UPDATE:
        golden.write_text(text)
    assert golden.read_text() == text, "rendering changed: run `make golden` if that was meant"


def test_no_stale_golden_files() -> None:
    assert sorted(p.name for p in (ROOT / "envoy").glob("*.yaml")) == [p.name for p in EXAMPLES]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_envoy_accepts_the_golden_file(example: Path) -> None:
    envoy_validate(ROOT / "envoy" / example.name)


def test_envoy_accepts_tls_listener_and_upstream_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "gateway.yaml").write_text(
        "listener: {address: 127.0.0.1, port: 4443, tls: {cert_file: server.pem, key_file: server.pem}}\n"
        "routes:\n"
        "  - {name: local, prefix: /local/, upstream: 'https://localhost:9443', ca_file: ca.pem}\n"
    )
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(render_yaml(load_config(tmp_path / "gateway.yaml")))
    envoy_validate(bootstrap)


# The typed_config types the renderer uses, so protobuf can resolve every "@type".
TYPED_CONFIG_MODULES = [
    "envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2",
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    "envoy.extensions.access_loggers.filters.cel.v3.cel_pb2",
    "envoy.extensions.access_loggers.grpc.v3.als_pb2",
    "envoy.extensions.filters.http.lua.v3.lua_pb2",
    "envoy.extensions.formatter.req_without_query.v3.req_without_query_pb2",
]


def test_dynamic_resources_parse_as_envoy_messages(tmp_path: Path) -> None:
    for module in TYPED_CONFIG_MODULES:
        importlib.import_module(module)
    config = load_config(EXAMPLES[0])
    XdsWriter(tmp_path / "xds").write(config)
    bootstrap = yaml.safe_load(render_yaml(config, tmp_path / "xds"))
    json_format.ParseDict(bootstrap, bootstrap_pb2.Bootstrap())
    for name in ("cds.json", "rds.json", "lds.json"):
        document = json.loads((tmp_path / "xds" / name).read_text())
        parsed = json_format.ParseDict(document, discovery_pb2.DiscoveryResponse())
        assert parsed.resources, name


def test_no_secret_reaches_the_rendered_config(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("sk-ant-api03-NEVER-RENDERED\n")
    (tmp_path / "gateway.yaml").write_text(
        "listener: {address: 127.0.0.1, port: 4000}\n"
        "routes:\n"
        "  - name: a\n    prefix: /a/\n    upstream: https://api.anthropic.com\n"
        "    credential: {header: x-api-key, secret: {file: key}}\n"
    )
    config = load_config(tmp_path / "gateway.yaml")
    XdsWriter(tmp_path / "xds").write(config)
    rendered = [render_yaml(config), *(p.read_text() for p in (tmp_path / "xds").iterdir())]
    assert not any("NEVER-RENDERED" in text for text in rendered)
