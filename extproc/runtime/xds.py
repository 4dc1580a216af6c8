"""Hand Envoy new listeners, routes and clusters by rewriting the files it watches.

Files are written to a temporary name in the same folder and moved into place,
so Envoy never reads half a file (it reloads on the move). Clusters come first,
then (once a running Envoy lists the new clusters as active) routes, then the
listener, so a route never names a cluster Envoy cannot use yet. The previous
generation's clusters are kept one reload longer, so requests still routed by
the old routes finish on their old cluster.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import urllib.error
from collections.abc import Collection
from pathlib import Path

from extproc.config.model import Endpoint, GatewayConfig
from extproc.render.bootstrap import RESOURCE_FILES, render_resources, to_json
from extproc.render.clusters import clusters
from extproc.render.common import Json
from extproc.runtime.envoy_admin import admin_get

log = logging.getLogger("extproc.runtime.xds")
CLUSTER_WAIT_SECONDS = 5.0


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (readers see old or new, never partial)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def wait_for_clusters(admin: Endpoint, names: Collection[str], deadline_s: float) -> None:
    """Wait until a running Envoy has made ``names`` active (warm), so routes may name them.

    Envoy warms a new cluster before using it; a route that names a cluster still
    warming gets 503 ``cluster_not_found``. Files give no acknowledgement, so the
    admin page is the only way to know. No Envoy running (first start): nothing to wait for.
    """
    end = time.monotonic() + deadline_s
    while True:
        try:
            page = admin_get(admin, "/clusters", timeout=1)
            active = {line.split("::", 1)[0] for line in page.splitlines()}
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                return  # Envoy not started yet: it reads every file when it starts
            active = set()
        except OSError:  # a busy Envoy: try again until the deadline
            active = set()
        if set(names) <= active:
            return
        if time.monotonic() > end:
            log.warning("Envoy has not activated clusters %s; writing routes anyway", sorted(names))
            return
        time.sleep(0.02)


class XdsWriter:
    """Writes the discovery files for one ``xds_dir``; remembers the previous clusters."""

    def __init__(self, xds_dir: Path) -> None:
        self.xds_dir = xds_dir
        self._previous: list[Json] = []

    def write(self, config: GatewayConfig) -> None:
        self.xds_dir.mkdir(parents=True, exist_ok=True)
        current = clusters(config)
        names = {cluster["name"] for cluster in current}
        retired = [cluster for cluster in self._previous if cluster["name"] not in names]
        documents = render_resources(config, self.xds_dir, retired)
        for kind in ("cds", "rds", "lds"):
            atomic_write(self.xds_dir / RESOURCE_FILES[kind], to_json(documents[kind]))
            if kind == "cds" and self._previous:
                added = names - {cluster["name"] for cluster in self._previous}
                wait_for_clusters(config.admin, added, CLUSTER_WAIT_SECONDS)
        self._previous = current
