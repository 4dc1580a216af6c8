"""Test certificates from a throwaway CA (trustme), written where Envoy can read them."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class CertFiles:
    """A CA and one server certificate, as PEM files on disk."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path  # the leaf followed by its chain
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """For a Python server presenting the certificate (offers no ALPN: HTTP/1.1 only)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """For a client that trusts only this CA."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        return context


def make_certs(folder: Path, *identities: str) -> CertFiles:
    """A fresh CA and a certificate for ``identities`` (default: localhost and 127.0.0.1)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert(*(identities or ("localhost", "127.0.0.1")))
    files = CertFiles(ca, folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca_file))
    leaf.private_key_pem.write_to_path(str(files.key_file))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(files.cert_file), append=index > 0)
    return files
