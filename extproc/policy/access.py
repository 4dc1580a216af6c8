"""Gateway client keys: who may spend the server's credential.

The keys file holds one ``<name> sha256:<hex>`` line per client, so the YAML,
the ConfigMap and the file itself never hold a usable key. A presented key is
hashed and compared against every entry in constant time; only the entry's
name travels on (metrics, access log), never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.@-]{0,62})\s+sha256:(?P<hex>[0-9a-f]{64})$")
KEY_PREFIX = "gk-"


class KeysFileError(Exception):
    """The keys file cannot be used; the message names the file and line, never a key."""


@dataclass(frozen=True, slots=True)
class GatewayKeys:
    """The hashed keys of one keys file, and the header clients send them in."""

    header: str
    entries: tuple[tuple[bytes, str], ...]  # (sha256 digest, client name)
    for_client_credentials: bool  # also demand a key when the client brings its own credential

    def identify(self, presented: bytes | None) -> str | None:
        """The client name for ``presented``, or None. Every entry is compared, always."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.strip()).digest()
        found = None
        for expected, name in self.entries:
            if hmac.compare_digest(expected, digest):
                found = name
        return found

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.entries)


def read_keys(path: Path) -> tuple[tuple[bytes, str], ...]:
    """Parse a keys file: ``name sha256:<hex>`` lines, ``#`` comments and blank lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeysFileError(f"keys file {path} cannot be read: {reason}") from None
    entries: list[tuple[bytes, str]] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise KeysFileError(f"{path}:{number}: expected '<name> sha256:<64 hex digits>'")
        if match["name"] in names:
            raise KeysFileError(f"{path}:{number}: client name {match['name']!r} is listed twice")
        names.add(match["name"])
        entries.append((bytes.fromhex(match["hex"]), match["name"]))
    return tuple(entries)


def new_key() -> str:
    """A fresh gateway key: 256 random bits, URL-safe, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_line(name: str, key: str) -> str:
    """The keys-file line for ``key``; raises ValueError for a name the file would reject."""
    line = f"{name} sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    if not _LINE.match(line):
        raise ValueError(f"client name {name!r}: use letters, digits, '.', '_', '@' and '-'")
    return line
