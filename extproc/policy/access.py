"""Gateway client keys: who may spend the server's credential.

The keys file holds one ``<name> sha256:<hex> [attribute=value ...]`` line per
key, so the YAML, the ConfigMap and the file itself never hold a usable key.
The attributes are ``created=`` (a date, for people), ``expires=`` (an ISO
time with a zone, or a date meaning 00:00 UTC) and ``teams=`` (comma
separated). A client may have several lines, one per key, so a key can be
rotated with overlap; its teams belong to the client, so every line of a name
must name the same teams (or none).

A presented key is hashed and its digest looked up in a table, so the check
costs the same for ten clients or a hundred thousand. Looking up the digest
directly leaks nothing a timing attacker can use: what the lookup's time
depends on is the SHA-256 of the attacker's own guess, and learning how that
digest compares with a stored one does not help find a preimage of the stored
one (the keys are 256 random bits). Only the entry's name travels on
(metrics, access log), never the key.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from extproc.config.files import FileProblem, read_bounded
from extproc.config.model import KEY_PREFIX

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ATTRIBUTES = ("created", "expires", "teams")
MAX_KEYS_FILE_BYTES = 64 * 2**20  # about 600,000 key lines
T = TypeVar("T")
_SHAPE = "expected '<name> sha256:<64 hex digits> [created=…] [expires=…] [teams=…]'"


class KeysFileError(Exception):
    """The keys file cannot be used; the message names the file and line, never a key."""


@dataclass(frozen=True, slots=True)
class Identity:
    """What a valid key says about its bearer: the client, its teams, the key's expiry."""

    name: str
    teams: tuple[str, ...] = ()
    expires: float = math.inf  # seconds since the epoch; inf: never


@dataclass(frozen=True, slots=True)
class KeyLine:
    """One parsed line of a keys file (the commands rewrite the file from these)."""

    name: str
    digest: str  # hex
    created: str = ""  # as written: a date or a time
    expires: datetime | None = None
    teams: tuple[str, ...] = ()

    def text(self) -> str:
        """The line as the file holds it."""
        words = [self.name, f"sha256:{self.digest}"]
        if self.created:
            words.append(f"created={self.created}")
        if self.expires is not None:
            words.append(f"expires={format_time(self.expires)}")
        if self.teams:
            words.append("teams=" + ",".join(self.teams))
        return " ".join(words)


@dataclass(frozen=True, slots=True)
class KeyTable:
    """One keys file, read once however many routes name it."""

    by_digest: Mapping[bytes, Identity] = field(repr=False)  # sha256 of the key → bearer
    digest: bytes = b""  # of the file's bytes: changes whenever the file does

    def identify(self, presented: bytes) -> Identity | None:
        """Who holds the key ``presented`` (surrounding white space ignored)."""
        return self.by_digest.get(hashlib.sha256(presented.strip()).digest())


@dataclass(frozen=True, slots=True)
class GatewayKeys:
    """A route's gateway keys: the table, and the header clients may also send them in."""

    header: str
    table: KeyTable
    for_client_credentials: bool  # also demand a key when the client brings its own credential

    def identify(self, presented: bytes | None) -> Identity | None:
        return None if presented is None else self.table.identify(presented)


def format_time(moment: datetime) -> str:
    """An expiry as the file and ``keys list`` show it: UTC, to the second."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """An ISO time with a zone (``Z`` or ``+02:00``), or a date meaning 00:00 UTC."""
    if _DATE.fullmatch(text):
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
    moment = datetime.fromisoformat(text)  # ValueError names nothing secret
    if moment.tzinfo is None:
        raise ValueError("needs a time zone, e.g. 2027-01-01T00:00:00Z")
    return moment


def parse_teams(text: str) -> tuple[str, ...]:
    """``ml,platform`` → ('ml', 'platform'): sorted, each a name like a client's."""
    teams = text.split(",")
    if not all(_NAME.fullmatch(team) for team in teams):
        raise ValueError("use comma-separated names of letters, digits, '.', '_', '@' and '-'")
    return tuple(sorted(set(teams)))


def parse_line(line: str) -> KeyLine:
    """One line without its comment; raises ValueError with a message that quotes no key."""
    words = line.split()
    if len(words) < 2 or not _NAME.fullmatch(words[0]) or not _DIGEST.fullmatch(words[1]):
        raise ValueError(_SHAPE)
    values: dict[str, str] = {}
    for word in words[2:]:
        attribute, equals, value = word.partition("=")
        if attribute not in _ATTRIBUTES or not equals:
            raise ValueError("unknown attribute: use created=, expires= or teams=")
        if attribute in values:
            raise ValueError(f"{attribute} is given twice")
        values[attribute] = value
    return KeyLine(
        words[0],
        words[1][7:],
        _parsed(values, "created", _created, ""),
        _parsed(values, "expires", parse_time, None),
        _parsed(values, "teams", parse_teams, ()),
    )


def _parsed(values: dict[str, str], attribute: str, parse: Callable[[str], T], default: T) -> T:
    if attribute not in values:
        return default
    try:
        return parse(values[attribute])
    except ValueError as exc:
        raise ValueError(f"{attribute}: {exc}") from None


def _created(text: str) -> str:
    parse_time(text)
    return text


def read_lines(path: Path) -> tuple[bytes, list[str]]:
    """The file's bytes and text lines; KeysFileError when it cannot be read."""
    try:
        data = read_bounded(path, MAX_KEYS_FILE_BYTES, "keys file")
        return data, data.decode("utf-8").splitlines()
    except FileProblem as exc:  # a directory, /dev/zero, a FIFO: never a hang or a traceback
        raise KeysFileError(f"keys file {path} {exc.reason}") from None
    except UnicodeDecodeError:
        raise KeysFileError(f"keys file {path} cannot be read: not UTF-8 text") from None


def parse_lines(path: Path, lines: list[str]) -> dict[int, KeyLine]:
    """Every key line by its line number; raises for the first bad one, naming path:line."""
    entries: dict[int, KeyLine] = {}
    digests: dict[str, str] = {}
    teams: dict[str, tuple[int, tuple[str, ...]]] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            entry = parse_line(line)
        except ValueError as exc:
            raise KeysFileError(f"{path}:{number}: {exc}") from None
        if entry.digest in digests:
            raise KeysFileError(
                f"{path}:{number}: the same key is listed for {digests[entry.digest]!r}"
            )
        first, known = teams.setdefault(entry.name, (number, entry.teams))
        if known != entry.teams:
            raise KeysFileError(
                f"{path}:{number}: client {entry.name!r} has teams {_teams(entry.teams)} here "
                f"but {_teams(known)} on line {first}: every key of a client names its teams"
            )
        digests[entry.digest] = entry.name
        entries[number] = entry
    return entries


def _teams(teams: tuple[str, ...]) -> str:
    return ",".join(teams) if teams else "(none)"


def read_keys(path: Path, previous: KeyTable | None = None) -> KeyTable:
    """Parse a keys file: key lines, ``#`` comments and blank lines.

    ``previous`` is returned as it is when the file's bytes have not changed,
    so a reload that leaves the keys alone does not parse them again.
    """
    data, lines = read_lines(path)
    file_digest = hashlib.sha256(data).digest()
    if previous is not None and previous.digest == file_digest:
        return previous
    by_digest: dict[bytes, Identity] = {}
    for entry in parse_lines(path, lines).values():
        expires = math.inf if entry.expires is None else entry.expires.timestamp()
        by_digest[bytes.fromhex(entry.digest)] = Identity(entry.name, entry.teams, expires)
    return KeyTable(MappingProxyType(by_digest), file_digest)


def new_key() -> str:
    """A fresh gateway key: 256 random bits, URL-safe, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    """The hex digest the keys file holds for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    """``name`` if the keys file takes it as a client name; ValueError otherwise."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"client name {name!r}: use letters, digits, '.', '_', '@' and '-'")
    return name
