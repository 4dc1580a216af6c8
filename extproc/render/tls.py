"""TLS transport sockets: downstream (the gateway listener) and upstream (providers).

Upstream certificates are always verified: against the route's ``ca_file`` or
the system bundle, with the SAN matched to the upstream host, so a wrong
certificate fails the connection before any header (and so any key) is sent.
Under ``up`` / ``serve --xds-dir`` both the listener's certificate and each CA
bundle come by file-based SDS, so a file replaced on disk is used without a restart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from extproc.config.model import TlsFiles, Upstream
from extproc.render.common import Json, is_ip, typed

LISTENER_CERTIFICATE = "listener-certificate"  # the SDS resource's name
# Where the SDS resource of a name is read from (Envoy takes one resource per SDS file).
SecretSource = Callable[[str], Json]
BUNDLE_NAME_PREFIX = "upstream-ca-"  # then the digest of the bundle's path


def downstream(files: TlsFiles, sds_source: Json | None = None) -> Json:
    """The listener's TLS: its certificate inline, or by SDS from ``sds_source`` (a watched file).

    By SDS, Envoy re-reads the certificate and key whenever a file is moved into their
    folder (a rotation), and new connections get the new certificate without a restart.
    """
    if sds_source is None:
        certificates: Json = {"tls_certificates": [_certificate(files)]}
    else:
        config = {"name": LISTENER_CERTIFICATE, "sds_config": sds_source}
        certificates = {"tls_certificate_sds_secret_configs": [config]}
    context = {"common_tls_context": {"alpn_protocols": ["h2", "http/1.1"], **certificates}}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", **context
        ),
    }


def secrets(files: TlsFiles | None) -> list[Json]:
    """The SDS resources (the listener's certificate, when it has TLS).

    ``watched_directory`` makes a rename in the files' folder (``mv``, cert-manager,
    Kubernetes' ``..data`` swap) the signal to re-read both files together.
    """
    if files is None:
        return []
    certificate = _certificate(files)
    if files.cert_file.parent == files.key_file.parent:
        certificate["watched_directory"] = {"path": str(files.cert_file.parent)}
    return [{"name": LISTENER_CERTIFICATE, "tls_certificate": certificate}]


def ca_secret_name(ca_file: Path) -> str:
    """One SDS resource per bundle, named by its path's digest (a stat-safe, bounded name)."""
    return BUNDLE_NAME_PREFIX + hashlib.sha256(str(ca_file).encode()).hexdigest()[:16]


def ca_secret(ca_file: Path) -> Json:
    """The bundle as an SDS resource, re-read when a file is moved into its folder."""
    validation = {
        "trusted_ca": {"filename": str(ca_file)},
        "watched_directory": {"path": str(ca_file.parent)},
    }
    return {"name": ca_secret_name(ca_file), "validation_context": validation}


def _certificate(files: TlsFiles) -> Json:
    return {
        "certificate_chain": {"filename": str(files.cert_file)},
        "private_key": {"filename": str(files.key_file)},
    }


def upstream(target: Upstream, ca_file: Path, sds_source: SecretSource | None = None) -> Json:
    """The upstream's TLS: trust ``ca_file`` inline, or by SDS from ``sds_source`` (watched).

    By SDS the host's SAN match stays here and the bundle comes from its secret
    (Envoy merges the two), so a replaced bundle is trusted by new connections.
    """
    san_type = "IP_ADDRESS" if is_ip(target.host) else "DNS"
    san = {
        "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": target.host}}]
    }
    common: Json
    if sds_source is None:
        common = {"validation_context": {"trusted_ca": {"filename": str(ca_file)}, **san}}
    else:
        name = ca_secret_name(ca_file)
        secret = {"name": name, "sds_config": sds_source(name)}
        combined = {
            "default_validation_context": san,
            "validation_context_sds_secret_config": secret,
        }
        common = {"combined_validation_context": combined}
    context: Json = {"common_tls_context": common}
    if san_type == "DNS":
        context["sni"] = target.host
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **context
        ),
    }
