"""A keys-file line for a test's gateway key (what ``gateway keys add`` writes, minus dates)."""

from __future__ import annotations

from extproc.policy.access import KeyLine, check_name, key_digest


def key_line(name: str, key: str) -> str:
    """The keys-file line for ``key``; raises ValueError for a name the file would reject."""
    return KeyLine(check_name(name), key_digest(key)).text()
