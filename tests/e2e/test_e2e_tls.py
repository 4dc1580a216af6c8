"""TLS on both sides of the gateway, with certificates made in the test (trustme).

Upstream: the route's ``ca_file`` decides whom Envoy trusts; a certificate from
another CA must stop the connection before any header (so any key) is sent.
Downstream: ``listener.tls`` serves HTTP/1.1 and HTTP/2 (ALPN) to clients, and a
certificate rotated on disk is served to new connections without a restart (SDS).
A CA bundle replaced on disk (``ca_file`` or ``ca_bundle``) is trusted likewise (SDS).
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from harness import (
    CertFiles,
    Gateway,
    RecordedRequest,
    RecordingUpstream,
    Reply,
    credential_route,
    http1,
    http2,
    make_certs,
    raw_request,
)
from harness.liveops import LiveGateway

SERVER_KEY = "sk-ant-api03-server-key-tls"
CLIENT_KEY = "sk-ant-api03-client-key-tls"
OAUTH = "Bearer sk-ant-oat01-tls-client"

pytestmark = pytest.mark.slow  # starts real Envoy and processor processes


@pytest.fixture
def tls_upstream(
    tmp_path: Path, start_upstream: Callable[..., RecordingUpstream]
) -> tuple[RecordingUpstream, Path]:
    """An HTTPS upstream for ``localhost`` and the CA file that trusts it."""
    certs = make_certs(tmp_path / "upstream-certs", "localhost")
    return start_upstream("tls-upstream", tls=certs.server_context()), certs.ca_file


def tls_route(upstream: RecordingUpstream, ca_file: Path) -> dict[str, object]:
    return credential_route("anthropic", upstream.url("localhost"), ca_file=str(ca_file))


def test_https_upstream_trusted_by_the_route_ca_gets_the_server_key(
    start_gateway: Callable[..., Gateway], tls_upstream: tuple[RecordingUpstream, Path]
) -> None:
    upstream, ca_file = tls_upstream
    gateway = start_gateway([tls_route(upstream, ca_file)], env={"ANTHROPIC_KEY": SERVER_KEY})
    with http1(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={})
    assert reply.status_code == 200
    seen = upstream.only_request()
    assert seen.values("x-api-key") == [SERVER_KEY.encode()]
    assert seen.values("host") == [f"localhost:{upstream.port}".encode()]


def test_https_upstream_receives_the_client_oauth_token_unchanged(
    start_gateway: Callable[..., Gateway], tls_upstream: tuple[RecordingUpstream, Path]
) -> None:
    upstream, ca_file = tls_upstream
    gateway = start_gateway([tls_route(upstream, ca_file)], env={"ANTHROPIC_KEY": SERVER_KEY})
    with http1(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={}, headers={"authorization": OAUTH})
    assert reply.status_code == 200
    seen = upstream.only_request()
    assert seen.values("authorization") == [OAUTH.encode()]
    assert not seen.has("x-api-key")


@pytest.mark.parametrize(
    "credential", [{}, {"x-api-key": CLIENT_KEY}], ids=["server-key", "client-key"]
)
def test_upstream_with_a_certificate_from_another_ca_never_sees_a_key(
    start_gateway: Callable[..., Gateway],
    tls_upstream: tuple[RecordingUpstream, Path],
    tmp_path: Path,
    credential: dict[str, str],
) -> None:
    upstream, _right_ca = tls_upstream
    wrong_ca = make_certs(tmp_path / "other-ca", "localhost").ca_file
    gateway = start_gateway([tls_route(upstream, wrong_ca)], env={"ANTHROPIC_KEY": SERVER_KEY})
    with http1(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={}, headers=credential)
    assert reply.status_code == 503
    assert reply.headers["content-type"] == "application/json"
    assert upstream.requests == []
    assert upstream.wait_handshake_failures(1) >= 1  # Envoy connected and refused the certificate


@pytest.fixture
def tls_gateway(
    tmp_path: Path, start_gateway: Callable[..., Gateway], upstream: RecordingUpstream
) -> tuple[Gateway, CertFiles]:
    """A gateway whose listener serves TLS with a test certificate, and the client context."""
    certs = make_certs(tmp_path / "listener-certs")
    listener = {"tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}}
    gateway = start_gateway(
        [credential_route("anthropic", upstream.url())],
        env={"ANTHROPIC_KEY": SERVER_KEY},
        listener=listener,
    )
    return gateway, certs


PROTOCOLS = {"http1": (http1, "HTTP/1.1"), "http2": (http2, "HTTP/2")}
# (client headers, the credential header to look at upstream, the value it must have there)
CASES = {
    "injected": ({}, "x-api-key", SERVER_KEY),
    "oauth": ({"authorization": OAUTH}, "authorization", OAUTH),
}


@pytest.mark.parametrize("protocol", PROTOCOLS.values(), ids=PROTOCOLS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_tls_listener_serves_http1_and_http2_with_the_same_decision(
    tls_gateway: tuple[Gateway, CertFiles],
    upstream: RecordingUpstream,
    protocol: tuple[Callable[..., httpx.Client], str],
    case: tuple[dict[str, str], str, str],
) -> None:
    (client_factory, version), (credential, header, expected) = protocol, case
    gateway, certs = tls_gateway
    assert gateway.base_url.startswith("https://")
    with client_factory(gateway.base_url, verify=certs.client_context()) as client:
        reply = client.post("/anthropic/v1/messages", json={}, headers=credential)
    assert reply.status_code == 200
    assert reply.http_version == version
    seen = upstream.only_request()
    assert seen.values(header) == [expected.encode()]
    assert seen.values("x-forwarded-proto") == [b"https"]


def test_tls_listener_keeps_raw_credential_bytes_over_http1(
    tls_gateway: tuple[Gateway, CertFiles], upstream: RecordingUpstream
) -> None:
    gateway, certs = tls_gateway
    context = certs.client_context()
    headers = [("X-API-KEY", b"sk-\xe9-client")]
    reply = raw_request(gateway.listener_port, "/anthropic/v1/messages", headers, tls=context)
    assert reply.status == 200
    assert upstream.only_request().values("x-api-key") == [b"sk-\xe9-client"]


def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The DER certificate a new TLS connection to the listener is given."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return der


def rotate(certs: CertFiles) -> bytes:
    """A new certificate from the same CA moved over the listener's files; returns its DER."""
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1")
    folder = certs.cert_file.parent
    leaf.private_key_pem.write_to_path(str(folder / ".key.new"))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(folder / ".cert.new"), append=index > 0)
    os.replace(folder / ".key.new", certs.key_file)  # renames: what cert-manager and mv do
    os.replace(folder / ".cert.new", certs.cert_file)
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def test_a_rotated_listener_certificate_is_served_to_new_connections_without_a_restart(
    tls_gateway: tuple[Gateway, CertFiles], upstream: RecordingUpstream
) -> None:
    gateway, certs = tls_gateway
    context = certs.client_context()
    first = served_certificate(gateway.listener_port, context)
    assert first == ssl.PEM_cert_to_DER_cert(certs.cert_file.read_text().split("\n\n")[0])
    envoy = gateway.envoy_process
    rotated = rotate(certs)
    assert rotated != first
    deadline = time.monotonic() + 30
    while (served := served_certificate(gateway.listener_port, context)) != rotated:
        assert served == first, "the listener served a certificate that is neither"
        assert time.monotonic() < deadline, "Envoy still serves the old certificate after 30 s"
        time.sleep(0.1)
    assert gateway.envoy_process is envoy and envoy is not None and envoy.poll() is None
    with http2(gateway.base_url, verify=context) as client:
        reply = client.post("/anthropic/v1/messages", json={})
    assert reply.status_code == 200
    assert upstream.only_request().values("x-api-key") == [SERVER_KEY.encode()]


def test_a_mistyped_ca_file_on_a_live_reload_fails_the_reload_and_the_old_config_serves_on(
    start_live: Callable[..., LiveGateway], tls_upstream: tuple[RecordingUpstream, Path]
) -> None:
    upstream, ca_file = tls_upstream
    route = tls_route(upstream, ca_file)
    gateway = start_live([route], env={"ANTHROPIC_KEY": SERVER_KEY})
    assert gateway.metric("gateway_config_last_reload_success") == 1
    gateway.reconfigure([{**route, "name": "renamed", "ca_file": str(ca_file) + ".typo"}])
    gateway.wait_metric("gateway_config_last_reload_success", lambda v: v == 0)
    with http1(gateway.base_url) as client:
        reply = client.post("/anthropic/v1/messages", json={})
    assert reply.status_code == 200  # the route and cluster of the last good config
    assert upstream.only_request().values("x-api-key") == [SERVER_KEY.encode()]
    log = gateway.extproc_log.read_text()
    assert f"routes[0].ca_file: certificate file {ca_file}.typo cannot be read" in log


def closing(_request: RecordedRequest) -> Reply:
    """Every answer closes its connection, so each request is a new TLS handshake."""
    return Reply(200, b'{"ok": true}', headers=(("connection", "close"),))


def replace_by_rename(source: Path, target: Path) -> None:
    """``target`` gets ``source``'s bytes in one rename, as ``mv`` and cert-manager do."""
    staged = target.with_name(f".{target.name}.new")
    staged.write_bytes(source.read_bytes())
    os.replace(staged, target)


def configmap(folder: Path, source: Path, version: str) -> Path:
    """A Kubernetes ConfigMap volume holding ``source`` as bundle.pem; the path pods read.

    Kubernetes writes a new ``..<version>`` folder, points ``..data_tmp`` at it and renames
    that over ``..data``: bundle.pem (a link through ``..data``) itself is never touched.
    """
    (folder / f"..{version}").mkdir(parents=True)
    (folder / f"..{version}" / "bundle.pem").write_bytes(source.read_bytes())
    (folder / "..data_tmp").symlink_to(f"..{version}")
    os.replace(folder / "..data_tmp", folder / "..data")
    if not (folder / "bundle.pem").is_symlink():
        (folder / "bundle.pem").symlink_to("..data/bundle.pem")
    return folder / "bundle.pem"


def post_status(gateway: Gateway, listener: CertFiles, path: str = "/anthropic/v1/messages") -> int:
    with http1(gateway.base_url, verify=listener.client_context()) as client:
        return client.post(path, json={}).status_code


# (where the bundle is named, how it is replaced)
SWAPS = {
    "ca_file-rename": ("ca_file", "rename"),
    "ca_bundle-rename": ("ca_bundle", "rename"),
    "ca_file-configmap": ("ca_file", "configmap"),
}


@pytest.mark.parametrize("swap", SWAPS.values(), ids=SWAPS.keys())
def test_a_ca_bundle_replaced_on_disk_is_trusted_by_new_upstream_connections_without_a_restart(
    start_gateway: Callable[..., Gateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
    swap: tuple[str, str],
) -> None:
    where, how = swap
    first, second = (make_certs(tmp_path / name, "localhost") for name in ("ca1", "ca2"))
    folder = tmp_path / "trust"
    if how == "rename":
        folder.mkdir()
        trust = folder / "bundle.pem"
        trust.write_bytes(first.ca_file.read_bytes())
    else:
        trust = configmap(folder, first.ca_file, "v1")
    served = first.server_context()
    served.options |= ssl.OP_NO_TICKET  # no resumption: every handshake shows the certificate
    served.num_tickets = 0
    upstream = start_upstream("tls-upstream", tls=served, responder=closing)
    route = credential_route("anthropic", upstream.url("localhost"))
    # Beside it, TLS files that do not change: another bundle and the listener's certificate.
    other, listener = make_certs(tmp_path / "ca3", "localhost"), make_certs(tmp_path / "listener")
    steady = start_upstream("steady", tls=other.server_context(), responder=closing)
    routes = [credential_route("openai", steady.url("localhost"), ca_file=str(other.ca_file))]
    env = {"ANTHROPIC_KEY": SERVER_KEY, "OPENAI_KEY": "sk-steady"}
    tls_files = {"tls": {"cert_file": str(listener.cert_file), "key_file": str(listener.key_file)}}
    if where == "ca_file":
        routes.append({**route, "ca_file": str(trust)})
        gateway = start_gateway(routes, env=env, listener=tls_files)
    else:
        routes.append(route)
        gateway = start_gateway(routes, env=env, listener=tls_files, top={"ca_bundle": str(trust)})
    envoy = gateway.envoy_process
    assert post_status(gateway, listener) == 200
    served.load_cert_chain(second.cert_file, second.key_file)  # the upstream moves to CA2
    assert post_status(gateway, listener) == 503  # a new connection: CA2's certificate, CA1 trusted
    assert upstream.wait_handshake_failures(1) >= 1
    if how == "rename":
        replace_by_rename(second.ca_file, trust)
    else:
        configmap(folder, second.ca_file, "v2")
    deadline = time.monotonic() + 30
    while (status := post_status(gateway, listener)) != 200:
        assert status == 503, f"neither refused nor served: {status}"
        assert time.monotonic() < deadline, "Envoy still trusts the old bundle after 30 s"
        time.sleep(0.1)
    assert gateway.envoy_process is envoy and envoy is not None and envoy.poll() is None
    assert [seen.values("x-api-key") for seen in upstream.requests] == [[SERVER_KEY.encode()]] * 2
    assert post_status(gateway, listener, "/openai/v1/chat/completions") == 200


def test_a_live_reload_to_another_ca_file_warms_its_bundle_and_retires_the_old_one(
    start_live: Callable[..., LiveGateway],
    start_upstream: Callable[..., RecordingUpstream],
    tmp_path: Path,
) -> None:
    first, second = (make_certs(tmp_path / name, "localhost") for name in ("ca1", "ca2"))
    served = first.server_context()
    served.options |= ssl.OP_NO_TICKET  # no resumption: every handshake shows the certificate
    served.num_tickets = 0
    upstream = start_upstream("tls-upstream", tls=served, responder=closing)
    route = tls_route(upstream, first.ca_file)
    gateway = start_live([route], env={"ANTHROPIC_KEY": SERVER_KEY})
    assert gateway.xds_dir is not None
    bundles = sorted(gateway.xds_dir.glob("upstream-ca-*.json"))
    assert len(bundles) == 1
    envoy = gateway.envoy_process
    with http1(gateway.base_url) as client:
        assert client.post("/anthropic/v1/messages", json={}).status_code == 200
        served.load_cert_chain(second.cert_file, second.key_file)
        assert client.post("/anthropic/v1/messages", json={}).status_code == 503
        for step in (1, 2):  # the second (a timeout) retires the cluster naming the first bundle
            loads = gateway.metric("gateway_config_reloads_total", result="success") or 0
            gateway.reconfigure([{**route, "ca_file": str(second.ca_file), "timeout_s": step}])
            gateway.wait_metric(
                "gateway_config_reloads_total", lambda v, n=loads: v == n + 1, result="success"
            )
            assert client.post("/anthropic/v1/messages", json={}).status_code == 200
            left = sorted(gateway.xds_dir.glob("upstream-ca-*.json"))
            assert (bundles[0] in left) is (step == 1), left
    assert gateway.envoy_process is envoy and envoy is not None and envoy.poll() is None
