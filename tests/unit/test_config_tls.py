"""TLS files are checked when the config is loaded (so also on every live reload): a CA file,
the listener's certificate and key, and the system CA bundle, found on the host or set."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from extproc.config import tlsfiles
from extproc.config.load import load_config
from extproc.config.model import GatewayConfig
from extproc.config.sections import ConfigError

ROUTE = """\
listener: {address: 127.0.0.1, port: 4000}
routes:
  - name: local
    prefix: /local/
    upstream: https://localhost:9443
"""
KEY_MARKER = "NEVER-PRINTED-KEY-BYTES"


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    """Real PEM files from a throwaway CA, and two that only look like files."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "junk")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    files["junk"].write_text(f"{KEY_MARKER}\n")
    return files


def load(folder: Path, text: str) -> GatewayConfig:
    path = folder / "gateway.yaml"
    path.write_text(text)
    return load_config(path)


def problems(folder: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(folder, text)
    assert not any(KEY_MARKER in line for line in caught.value.problems)
    return list(caught.value.problems)


def listener_tls(cert: str, key: str) -> str:
    return ROUTE.replace(
        "port: 4000}", f"port: 4000, tls: {{cert_file: {cert}, key_file: {key}}}}}"
    )


def test_good_tls_files_load(pem: dict[str, Path], tmp_path: Path) -> None:
    config = load(tmp_path, listener_tls("cert.pem", "key.pem") + "    ca_file: ca.pem\n")
    assert config.routes[0].ca_file == pem["ca"]
    assert config.listener.tls is not None and config.listener.tls.key_file == pem["key"]


CA_CASES = [
    ("missing", "nope.pem", "certificate file {dir}/nope.pem cannot be read: No such file or directory"),
    ("a directory", ".", "certificate file {dir} is not a regular file"),
    ("a key, not a certificate", "key.pem", "certificate file {dir}/key.pem is not PEM (no -----BEGIN CERTIFICATE----- line)"),
    ("not PEM at all", "junk.pem", "certificate file {dir}/junk.pem is not PEM (no -----BEGIN CERTIFICATE----- line)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("given", "message"), [c[1:] for c in CA_CASES], ids=[c[0] for c in CA_CASES]
)
def test_a_ca_file_that_cannot_be_used_is_an_error_at_its_line(
    pem: dict[str, Path], tmp_path: Path, given: str, message: str
) -> None:
    assert problems(tmp_path, ROUTE + f"    ca_file: {given}\n") == [
        f"gateway.yaml:6 routes[0].ca_file: {message.format(dir=tmp_path)}"
    ]


def test_listener_files_that_cannot_be_used_are_errors_without_their_content(
    pem: dict[str, Path], tmp_path: Path
) -> None:
    assert problems(tmp_path, listener_tls("key.pem", "junk.pem")) == [
        f"gateway.yaml:1 listener.tls.cert_file: certificate file {tmp_path}/key.pem is not PEM "
        "(no -----BEGIN CERTIFICATE----- line)",
        f"gateway.yaml:1 listener.tls.key_file: private key file {tmp_path}/junk.pem is not PEM "
        "(no -----BEGIN PRIVATE KEY----- line)",
    ]


def test_an_encrypted_private_key_is_refused(pem: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "enc.pem").write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAA==\n")
    assert problems(tmp_path, listener_tls("cert.pem", "enc.pem")) == [
        f"gateway.yaml:1 listener.tls.key_file: private key file {tmp_path}/enc.pem is not PEM "
        "(no -----BEGIN PRIVATE KEY----- line)"
    ]


def test_ca_bundle_sets_the_system_bundle(pem: dict[str, Path], tmp_path: Path) -> None:
    assert load(tmp_path, ROUTE + "ca_bundle: ca.pem\n").system_ca_file == pem["ca"]


def test_a_ca_bundle_that_cannot_be_used_is_an_error_at_its_line(
    pem: dict[str, Path], tmp_path: Path
) -> None:
    assert problems(tmp_path, ROUTE + "ca_bundle: junk.pem\n") == [
        f"gateway.yaml:6 ca_bundle: certificate file {tmp_path}/junk.pem is not PEM "
        "(no -----BEGIN CERTIFICATE----- line)"
    ]


def test_the_default_bundle_is_the_first_found_on_the_host(
    pem: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsfiles, "SYSTEM_BUNDLES", (tmp_path / "debian.crt", pem["ca"]))
    assert load(tmp_path, ROUTE).system_ca_file == pem["ca"]


def test_no_bundle_on_the_host_is_an_error_for_an_https_route_without_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsfiles, "SYSTEM_BUNDLES", (tmp_path / "none.crt",))
    assert problems(tmp_path, ROUTE) == [
        f"gateway.yaml:5 routes[0].upstream: no system CA bundle found on this host (looked for "
        f"{tmp_path}/none.crt): set ca_bundle: at the top level, or this route's ca_file"
    ]


def test_no_bundle_on_the_host_is_fine_when_no_route_needs_one(
    pem: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsfiles, "SYSTEM_BUNDLES", (tmp_path / "none.crt",))
    load(tmp_path, ROUTE + "    ca_file: ca.pem\n")
    load(tmp_path, ROUTE.replace("https://localhost:9443", "http://localhost:9080"))
