"""Render the Envoy bootstrap from the validated config (no secrets ever reach it)."""

from extproc.render.bootstrap import render_bootstrap, render_yaml

__all__ = ["render_bootstrap", "render_yaml"]
