"""TLS transport sockets: downstream (the gateway listener) and upstream (providers).

Upstream certificates are always verified: against the route's ``ca_file`` or
the system bundle, with the SAN matched to the upstream host, so a wrong
certificate fails the connection before any header (and so any key) is sent.
"""

from __future__ import annotations

from pathlib import Path

from extproc.config.model import TlsFiles, Upstream
from extproc.render.common import Json, is_ip, typed


def downstream(files: TlsFiles) -> Json:
    context = {
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(files.cert_file)},
                    "private_key": {"filename": str(files.key_file)},
                }
            ],
        }
    }
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", **context
        ),
    }


def upstream(target: Upstream, ca_file: Path) -> Json:
    san_type = "IP_ADDRESS" if is_ip(target.host) else "DNS"
    validation = {
        "trusted_ca": {"filename": str(ca_file)},
        "match_typed_subject_alt_names": [
            {"san_type": san_type, "matcher": {"exact": target.host}}
        ],
    }
    context: Json = {"common_tls_context": {"validation_context": validation}}
    if san_type == "DNS":
        context["sni"] = target.host
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **context
        ),
    }
