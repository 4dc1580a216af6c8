"""The price table's name, without loading the table (``status`` shows it)."""

from __future__ import annotations

import hashlib
from importlib.metadata import version

from extproc.config.spend import Price


def table_version(overrides: tuple[tuple[str, Price], ...]) -> str:
    """The genai-prices release whose bundled table prices requests, and the overrides' digest."""
    digest = hashlib.sha256(repr(sorted(overrides)).encode()).hexdigest()[:8]
    found = f"genai-prices {version('genai-prices')}"
    return found + (f" + overrides {digest}" if overrides else "")
