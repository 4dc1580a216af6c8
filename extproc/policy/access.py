"""Gateway client keys: who may spend the server's credential.

The keys file holds one ``<name> sha256:<hex>`` line per client, so the YAML,
the ConfigMap and the file itself never hold a usable key. A presented key is
hashed and its digest looked up in a table, so the check costs the same for
ten clients or a hundred thousand. Looking up the digest directly leaks
nothing a timing attacker can use: what the lookup's time depends on is the
SHA-256 of the attacker's own guess, and learning how that digest compares
with a stored one does not help find a preimage of the stored one (the keys
are 256 random bits). Only the entry's name travels on (metrics, access log),
never the key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from extproc.config.model import KEY_PREFIX

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.@-]{0,62})\s+sha256:(?P<hex>[0-9a-f]{64})$")


class KeysFileError(Exception):
    """The keys file cannot be used; the message names the file and line, never a key."""


@dataclass(frozen=True, slots=True)
class KeyTable:
    """One keys file, read once however many routes name it."""

    by_digest: Mapping[bytes, str] = field(repr=False)  # sha256 of the key → client name
    digest: bytes = b""  # of the file's bytes: changes whenever the file does

    def identify(self, presented: bytes) -> str | None:
        """The client name for the key ``presented`` (surrounding white space ignored)."""
        return self.by_digest.get(hashlib.sha256(presented.strip()).digest())


@dataclass(frozen=True, slots=True)
class GatewayKeys:
    """A route's gateway keys: the table, and the header clients may also send them in."""

    header: str
    table: KeyTable
    for_client_credentials: bool  # also demand a key when the client brings its own credential

    def identify(self, presented: bytes | None) -> str | None:
        return None if presented is None else self.table.identify(presented)


def read_keys(path: Path, previous: KeyTable | None = None) -> KeyTable:
    """Parse a keys file: ``name sha256:<hex>`` lines, ``#`` comments and blank lines.

    ``previous`` is returned as it is when the file's bytes have not changed,
    so a reload that leaves the keys alone does not parse them again.
    """
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeysFileError(f"keys file {path} cannot be read: {reason}") from None
    file_digest = hashlib.sha256(data).digest()
    if previous is not None and previous.digest == file_digest:
        return previous
    by_digest: dict[bytes, str] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise KeysFileError(f"{path}:{number}: expected '<name> sha256:<64 hex digits>'")
        name = match["name"]
        if name in names:
            raise KeysFileError(f"{path}:{number}: client name {name!r} is listed twice")
        digest = bytes.fromhex(match["hex"])
        if digest in by_digest:
            raise KeysFileError(
                f"{path}:{number}: the same key is listed for {by_digest[digest]!r}"
            )
        names.add(name)
        by_digest[digest] = name
    return KeyTable(MappingProxyType(by_digest), file_digest)


def new_key() -> str:
    """A fresh gateway key: 256 random bits, URL-safe, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_line(name: str, key: str) -> str:
    """The keys-file line for ``key``; raises ValueError for a name the file would reject."""
    line = f"{name} sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    if not _LINE.match(line):
        raise ValueError(f"client name {name!r}: use letters, digits, '.', '_', '@' and '-'")
    return line
