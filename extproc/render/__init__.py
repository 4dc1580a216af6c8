"""Render stage, beside policy: the Envoy bootstrap and xDS resources from the
validated config, one module per Envoy concern; no secret ever reaches it.

Imports only ``extproc.config``.
"""

from extproc.render.bootstrap import render_bootstrap, render_yaml

__all__ = ["render_bootstrap", "render_yaml"]
