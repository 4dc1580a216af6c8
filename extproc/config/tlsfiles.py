"""TLS files checked at load: they exist, can be read and look like what they are named.

Envoy reads certificate files itself, when it builds a listener or a cluster; a
missing or mistyped file there is a rejected update long after ``validate`` said
yes (and, on a live reload, routes already pointing at a cluster Envoy refused).
So the loader reads each one first. Only PEM markers are looked at and messages
never quote a file's content: a private key must not reach a log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from extproc.config.files import FileProblem, read_bounded

MAX_PEM_BYTES = 16 * 2**20  # a system bundle is about 200 KiB
# Where distributions keep the system's CA bundle, most common first.
SYSTEM_BUNDLES = (
    Path("/etc/ssl/certs/ca-certificates.crt"),  # Debian, Ubuntu, Alpine (ca-certificates)
    Path("/etc/pki/tls/certs/ca-bundle.crt"),  # RHEL, Fedora, CentOS, Amazon Linux
    Path("/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"),  # RHEL 7+, Fedora
    Path("/etc/ssl/ca-bundle.pem"),  # openSUSE, SLES
    Path("/etc/ssl/cert.pem"),  # macOS, Alpine, OpenBSD
    Path("/usr/local/etc/openssl/cert.pem"),  # FreeBSD, Homebrew on Intel macOS
    Path("/opt/homebrew/etc/ca-certificates/cert.pem"),  # Homebrew on Apple silicon
)
_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----")
_PRIVATE_KEY = re.compile(rb"-----BEGIN (RSA |EC |)PRIVATE KEY-----")


def certificate_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as PEM certificates (a chain or a CA bundle), or None."""
    return _problem(path, "certificate file", _CERTIFICATE, "-----BEGIN CERTIFICATE-----")


def private_key_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an unencrypted PEM private key, or None."""
    return _problem(path, "private key file", _PRIVATE_KEY, "-----BEGIN PRIVATE KEY-----")


def system_bundle(candidates: Iterable[Path] | None = None) -> Path | None:
    """The first CA bundle of this host's usual places (``SYSTEM_BUNDLES``) that is a file."""
    found = SYSTEM_BUNDLES if candidates is None else candidates
    return next((path for path in found if path.is_file()), None)


def _problem(path: Path, what: str, marker: re.Pattern[bytes], shown: str) -> str | None:
    try:
        data = read_bounded(path, MAX_PEM_BYTES, what)
    except FileProblem as exc:
        return f"{what} {path} {exc.reason}"
    if marker.search(data) is None:
        return f"{what} {path} is not PEM (no {shown} line)"
    return None
