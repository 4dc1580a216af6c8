"""Envoy's admin API over plain HTTP on loopback (readiness, listeners, clusters, drain).

Kept free of gRPC imports: the xDS writer uses it inside the processor too.
"""

from __future__ import annotations

import urllib.request

from extproc.config.model import Endpoint


def admin_get(admin: Endpoint, path: str, method: str = "GET", timeout: float = 2.0) -> str:
    """The body of an admin page; raises urllib.error.URLError/OSError (non-2xx included)."""
    url = f"http://{admin.address}:{admin.port}{path}"
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 (our http URL)
        return str(reply.read().decode())
