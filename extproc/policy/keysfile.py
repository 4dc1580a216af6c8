"""Keys-file edits for the key commands: add, rotate, revoke, list.

Each command reads the file with the gateway's own checks (so it never writes a
file the gateway would refuse), changes whole lines, keeps comments and blank
lines, and replaces the file atomically: a temp file in the same folder,
renamed over the old one with its mode. A reload sees the old file or the new
one, never half of one. A refused command leaves the file as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from extproc.config.files import write_atomic
from extproc.policy.access import (
    KeyLine,
    KeysFileError,
    check_name,
    format_time,
    key_digest,
    parse_lines,
    parse_time,
    read_lines,
)

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
ID_DIGITS = 10  # how much of a key's digest ``list`` shows as its id
_MIN_ID = 6  # the shortest id ``revoke --key`` takes


class KeysCommandError(Exception):
    """A key command refused; the message says why and what to do, never a key."""


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``90s`` or plain seconds."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"duration {text!r}: use a number and s, m, h or d (e.g. 7d)")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def parse_expiry(text: str, now: datetime) -> datetime:
    """``--expires``: a duration from now (``90d``) or a time (``2027-01-01``, ISO with zone)."""
    if _DURATION.fullmatch(text):
        return now + parse_duration(text)
    try:
        return parse_time(text)
    except ValueError as exc:
        raise ValueError(f"--expires {text!r}: {exc} (or give a duration such as 90d)") from None


@dataclass(frozen=True, slots=True)
class KeysFile:
    """A keys file's lines as read, and the key lines among them by index."""

    path: Path
    lines: tuple[str, ...]
    entries: dict[int, KeyLine]  # by index into ``lines``

    @classmethod
    def read(cls, path: Path, missing_ok: bool = False) -> KeysFile:
        """The file, checked as the gateway checks it; an absent one is empty if ``missing_ok``."""
        if missing_ok and not path.exists():
            return cls(path, (), {})
        try:
            _, lines = read_lines(path)
            entries = parse_lines(path, lines)
        except KeysFileError as exc:
            raise KeysCommandError(str(exc)) from None
        return cls(path, tuple(lines), {number - 1: entry for number, entry in entries.items()})

    def of(self, name: str) -> dict[int, KeyLine]:
        return {i: entry for i, entry in self.entries.items() if entry.name == name}

    def changed(self, edits: dict[int, KeyLine | None], added: KeyLine | None = None) -> str:
        """The file's text with lines replaced (a comment after them kept) or dropped (None)."""
        out: list[str] = []
        for index, raw in enumerate(self.lines):
            if index not in edits:
                out.append(raw)
                continue
            edit = edits[index]
            if edit is not None:
                comment = raw.partition("#")[2]
                out.append(edit.text() + (f"  #{comment}" if comment else ""))
        if added is not None:
            out.append(added.text())
        return "".join(line + "\n" for line in out)

    def write(self, text: str) -> None:
        """Replace the file with ``text`` atomically, keeping its mode."""
        try:
            write_atomic(self.path.resolve(), text)  # through a symlink: the file it names
        except OSError as exc:
            raise KeysCommandError(
                f"keys file {self.path} cannot be written: {exc.strerror}"
            ) from None


def add(
    keys: KeysFile, name: str, key: str, now: datetime, *, expires: datetime | None,
    teams: tuple[str, ...],
) -> str:  # fmt: skip
    """The file with a first key for ``name``; refuses a name the file already has."""
    held = keys.of(check_name(name))
    if held:
        line = min(held) + 1
        raise KeysCommandError(
            f"{keys.path}:{line}: client {name!r} already has a key; for a new one use "
            f"'keys rotate {keys.path} {name}' (the old key keeps working for an overlap)"
        )
    return keys.changed({}, KeyLine(name, key_digest(key), created(now), expires, teams))


def rotate(
    keys: KeysFile, name: str, key: str, now: datetime, *, overlap: timedelta,
    expires: datetime | None, teams: tuple[str, ...] | None,
) -> str:  # fmt: skip
    """The file with a new key for ``name``; its other keys expire after ``overlap`` at most.

    ``teams`` None keeps the client's teams; given, it replaces them on every key.
    """
    held = _held(keys, name)
    cutoff = now + overlap
    kept = next(iter(held.values())).teams if teams is None else teams
    edits: dict[int, KeyLine | None] = {
        index: replace(entry, teams=kept, expires=min(entry.expires or cutoff, cutoff))
        for index, entry in held.items()
    }
    return keys.changed(edits, KeyLine(name, key_digest(key), created(now), expires, kept))


def revoke(keys: KeysFile, name: str, key_id: str | None) -> tuple[str, int]:
    """The file without ``name``'s keys (or only the one whose digest starts with ``key_id``)."""
    held = _held(keys, name)
    if key_id is not None:
        held = _by_id(keys, name, held, key_id.lower())
    return keys.changed(dict.fromkeys(held)), len(held)


def _held(keys: KeysFile, name: str) -> dict[int, KeyLine]:
    held = keys.of(name)
    if not held:
        raise KeysCommandError(
            f"{keys.path}: no client {name!r}; for a first key use 'keys add {keys.path} {name}'"
        )
    return held


def _by_id(keys: KeysFile, name: str, held: dict[int, KeyLine], key_id: str) -> dict[int, KeyLine]:
    if len(key_id) < _MIN_ID or not all(c in "0123456789abcdef" for c in key_id):
        raise KeysCommandError(
            f"key id {key_id!r}: give at least {_MIN_ID} hex digits from 'keys list'"
        )
    found = {i: entry for i, entry in held.items() if entry.digest.startswith(key_id)}
    if len(found) != 1:
        if not found:
            raise KeysCommandError(f"{keys.path}: no key of {name!r} has id {key_id}")
        raise KeysCommandError(
            f"{keys.path}: key id {key_id} matches {len(found)} keys of {name!r}: give more digits"
        )
    return found


def listing(keys: KeysFile, now: datetime) -> list[tuple[str, str, str, str, str]]:
    """(name, key id, created, expires, teams) per key, in file order; never a key."""
    rows = []
    for entry in keys.entries.values():
        expires = "never"
        if entry.expires is not None:
            expires = format_time(entry.expires) + (" (expired)" if entry.expires <= now else "")
        teams = ",".join(entry.teams) or "-"
        rows.append((entry.name, entry.digest[:ID_DIGITS], entry.created or "-", expires, teams))
    return rows


def created(now: datetime) -> str:
    """The ``created=`` value for a key made at ``now``."""
    return now.astimezone(UTC).date().isoformat()


def utc_now() -> datetime:
    return datetime.now(UTC)
