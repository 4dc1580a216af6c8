"""Hand Envoy new listeners, routes and clusters by rewriting the files it watches.

Files are written to a temporary name in the same folder and moved into place,
so Envoy never reads half a file (it reloads on the move). Clusters come first,
then routes, then the listener, so a route never names a cluster Envoy does not
know yet. The clusters of the previous generation are kept one reload longer,
so requests still routed by the old routes finish on their old cluster.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from extproc.model import GatewayConfig
from extproc.render.bootstrap import RESOURCE_FILES, render_resources, to_yaml
from extproc.render.clusters import clusters
from extproc.render.common import Json


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
            atomic_write(
                self.xds_dir / RESOURCE_FILES[kind], to_yaml(documents[kind], config.source)
            )
        self._previous = current
