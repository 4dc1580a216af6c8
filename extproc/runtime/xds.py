"""Hand Envoy new listeners, routes and clusters by rewriting the files it watches.

Files are written to a temporary name in the same folder and moved into place,
so Envoy never reads half a file (it reloads on the move). Clusters come first,
then (once a running Envoy lists the new clusters as active) routes, then the
listener, so a route never names a cluster Envoy cannot use yet. The previous
generation's clusters are kept one reload longer, so requests still routed by
the old routes finish on their old cluster; the CA bundles' SDS files (one each,
written before everything else) stay as long as a cluster names them.

Each file carries the policy version as its ``version_info``. File-based xDS
has no ACK; Envoy's ``version_text`` stat for CDS, RDS and LDS is the
acknowledgement: a write is delivered only once a running Envoy shows the new
version for all three. If it does not (a file rejected, a disk error, no answer
in time) the last delivered files are written back and ``DeliveryError`` is
raised, so Envoy and the processor stay on the same config.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.error
from collections.abc import Collection, Mapping
from pathlib import Path

from extproc.config.files import write_atomic
from extproc.config.model import Endpoint, GatewayConfig
from extproc.render.bootstrap import (
    RESOURCE_FILES,
    render_bundles,
    render_resources,
    secret_file,
    secret_source,
    to_json,
)
from extproc.render.clusters import ca_files, clusters
from extproc.render.common import Json
from extproc.render.tls import BUNDLE_NAME_PREFIX
from extproc.runtime.envoy_admin import admin_get

log = logging.getLogger("extproc.runtime.xds")
CLUSTER_WAIT_SECONDS = 5.0
ACCEPT_WAIT_SECONDS = 10.0
KINDS = ("sds", "cds", "rds", "lds")  # the certificate before the listener that names it
# One stat each: the version Envoy last accepted from that file (the route config is "gateway").
VERSION_STATS = {
    "cds": "cluster_manager.cds.version_text",
    "rds": "http.gateway.rds.gateway.version_text",
    "lds": "listener_manager.lds.version_text",
}
_VERSION_FILTER = "/stats?filter=" + "|".join(
    "^" + re.escape(stat) + "$" for stat in VERSION_STATS.values()
)


class DeliveryError(Exception):
    """Envoy did not take the new files (or they could not be written); the old ones are back."""


class EnvoyAway(Exception):
    """No Envoy answers on the admin port (not started yet, or run elsewhere)."""


def envoy_versions(admin: Endpoint, timeout: float = 1.0) -> dict[str, str]:
    """The version Envoy last accepted per kind (cds, rds, lds); "" for one not loaded yet.

    Raises EnvoyAway if nothing listens on the admin port, OSError if Envoy does not answer.
    """
    try:
        page = admin_get(admin, _VERSION_FILTER, timeout=timeout)
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            raise EnvoyAway(f"no Envoy admin on {admin.address}:{admin.port}") from exc
        raise
    found = {}
    for line in page.splitlines():
        stat, _, value = line.partition(": ")
        found[stat] = value.strip().strip('"')
    return {kind: found.get(stat, "") for kind, stat in VERSION_STATS.items()}


def wait_accepted(admin: Endpoint, version: str, deadline_s: float) -> None:
    """Until a running Envoy shows ``version`` for CDS, RDS and LDS; raises DeliveryError.

    No Envoy running (first start, or Envoy is elsewhere): nothing to wait for,
    it reads every file when it starts.
    """
    end = time.monotonic() + deadline_s
    versions: dict[str, str] = {}
    while True:
        try:
            versions = envoy_versions(admin)
        except EnvoyAway:
            return
        except OSError:  # a busy Envoy: ask again until the deadline
            pass
        if versions and all(v == version for v in versions.values()):
            return
        if time.monotonic() > end:
            behind = sorted(kind for kind, v in versions.items() if v != version) or list(KINDS)
            raise DeliveryError(
                f"Envoy did not accept config {version} within {deadline_s:.0f}s "
                f"({', '.join(behind)} not taken: see Envoy's log)"
            )
        time.sleep(0.02)


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
    """Writes the discovery files for one ``xds_dir``; remembers what Envoy last took."""

    def __init__(self, xds_dir: Path, accept_wait_s: float = ACCEPT_WAIT_SECONDS) -> None:
        self.xds_dir = xds_dir
        self.accept_wait_s = accept_wait_s
        self._previous: list[Json] = []  # the clusters of the last delivered config
        self._previous_cas: dict[str, Path] = {}  # their CA bundles, by cluster name
        self._delivered: dict[str, str] = {}  # the files' texts Envoy last accepted, by name

    def write(self, config: GatewayConfig, version: str = "") -> None:
        """Write the files for ``config`` and (with a version) wait until Envoy takes them.

        Raises DeliveryError (with the last delivered files written back) if it does not.
        """
        current = clusters(config, secret_source(self.xds_dir))  # as render_resources does
        names = {cluster["name"] for cluster in current}
        retired = [cluster for cluster in self._previous if cluster["name"] not in names]
        retired_cas = [ca for name, ca in self._previous_cas.items() if name not in names]
        kinds = render_resources(config, self.xds_dir, retired)
        # By file name, the bundles first: unversioned, as they only name a file (never rewritten).
        texts = {name: to_json(doc) for name, doc in render_bundles(config, retired_cas).items()}
        texts |= {RESOURCE_FILES[k]: to_json(_versioned(kinds[k], version)) for k in KINDS}
        try:
            self._write_all(config.admin, texts, names)
            if version:
                wait_accepted(config.admin, version, self.accept_wait_s)
        except (OSError, DeliveryError) as exc:
            self._roll_back(config.admin)
            raise exc if isinstance(exc, DeliveryError) else DeliveryError(str(exc)) from exc
        self._previous = current
        self._previous_cas = ca_files(config)
        self._delivered = texts
        self._remove_unnamed_bundles(texts)

    def _write_all(self, admin: Endpoint, texts: Mapping[str, str], names: set[str]) -> None:
        """Write ``texts`` (by file name) in their order, waiting for new clusters after CDS."""
        self.xds_dir.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            if name.startswith(BUNDLE_NAME_PREFIX) and _holds(self.xds_dir / name, text):
                continue  # each move in the folder makes Envoy re-read all it watches there
            write_atomic(self.xds_dir / name, text, 0o644)  # Envoy may run as another user
            if name == RESOURCE_FILES["cds"] and self._previous:
                added = names - {cluster["name"] for cluster in self._previous}
                wait_for_clusters(admin, added, CLUSTER_WAIT_SECONDS)

    def _roll_back(self, admin: Endpoint) -> None:
        """Put back the files Envoy last accepted (best effort: the error is already raised)."""
        if not self._delivered:
            return
        try:
            self._write_all(admin, self._delivered, set())
        except OSError as exc:
            log.error("could not write back the last delivered xDS files: %s", exc)

    def _remove_unnamed_bundles(self, texts: Mapping[str, str]) -> None:
        """Delete the SDS files of CA bundles no delivered cluster names any more."""
        for path in self.xds_dir.glob(secret_file(BUNDLE_NAME_PREFIX + "*")):
            if path.name not in texts:
                path.unlink(missing_ok=True)


def _holds(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


def _versioned(document: Json, version: str) -> Json:
    return {"version_info": version, **document} if version else document
