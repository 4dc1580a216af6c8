"""The key commands: ``keygen`` and ``keys add | rotate | revoke | list``.

Keys are printed once, to the person running the command; the file gets only
their digests. Every expected failure (a refused name, a missing folder, an
unreadable or bad file) is one line on stderr and exit code 2, the file
unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from extproc.policy import keysfile
from extproc.policy.access import (
    KeyLine,
    check_name,
    format_time,
    key_digest,
    new_key,
    parse_teams,
)
from extproc.policy.keysfile import KeysCommandError, KeysFile, created


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keygen`` and ``keys …`` to the command line."""
    keygen = commands.add_parser("keygen", help="make a gateway client key and its keys-file line")
    _name(keygen)
    keygen.add_argument(
        "--append", type=Path, metavar="KEYS_FILE", help="add the line to KEYS_FILE (as 'keys add')"
    )
    _new_key_options(keygen)
    keygen.set_defaults(handler=_guarded(_keygen))
    keys = commands.add_parser(
        "keys", help="add, rotate, revoke or list gateway keys in a keys file",
        description="Edit a keys file in place (atomically, comments kept); a running "
        "gateway picks the change up live.",
    )  # fmt: skip
    actions = keys.add_subparsers(dest="action", required=True)
    add = _action(actions, "add", _add, "a first key for a new client (prints the key once)")
    _name(add)
    _new_key_options(add)
    rotate = _action(
        actions, "rotate", _rotate, "a new key for a client; its old keys expire after an overlap"
    )
    _name(rotate)
    rotate.add_argument(
        "--overlap", default="7d", type=_duration,
        help="how long the old keys keep working (default 7d; 0: not at all)",
    )  # fmt: skip
    _new_key_options(rotate, teams_help="replace the client's teams on all its keys")
    revoke = _action(actions, "revoke", _revoke, "remove a client's keys, or one of them")
    _name(revoke)
    revoke.add_argument("--key", metavar="ID", help="only the key with this id (from 'keys list')")
    _action(actions, "list", _list, "names, key ids, creation and expiry dates, teams; no keys")


def _action(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Callable[[argparse.Namespace], int],
    text: str,
) -> argparse.ArgumentParser:
    action = actions.add_parser(name, help=text, description=text)
    action.add_argument("keys_file", type=Path, metavar="KEYS_FILE")
    action.set_defaults(handler=_guarded(handler))
    return action


def _name(command: argparse.ArgumentParser) -> None:
    command.add_argument("name", help="who the key is for (shown in metrics and the access log)")


def _new_key_options(
    command: argparse.ArgumentParser, teams_help: str = "the client's teams"
) -> None:
    command.add_argument(
        "--expires", metavar="WHEN",
        help="the new key stops working: a duration (90d), a date or an ISO time with zone",
    )  # fmt: skip
    command.add_argument(
        "--team", action="append", metavar="TEAM",
        help=f"{teams_help} (repeat it, or comma-separate)",
    )  # fmt: skip


def _duration(text: str) -> timedelta:
    try:
        return keysfile.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Every expected failure is one line and exit 2, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (KeysCommandError, ValueError) as exc:
            print(exc, file=sys.stderr)
            return 2

    return run


def _teams(args: argparse.Namespace) -> tuple[str, ...] | None:
    if args.team is None:
        return None
    try:
        return parse_teams(",".join(args.team))
    except ValueError as exc:
        raise ValueError(f"--team: {exc}") from None


def _expires(args: argparse.Namespace, now: datetime) -> datetime | None:
    return None if args.expires is None else keysfile.parse_expiry(args.expires, now)


def _add(args: argparse.Namespace) -> int:
    now, key = keysfile.utc_now(), new_key()
    keys = KeysFile.read(args.keys_file, missing_ok=True)
    text = keysfile.add(
        keys, args.name, key, now, expires=_expires(args, now), teams=_teams(args) or ()
    )
    keys.write(text)
    _print_key(args.name, key)
    print(f"added to {args.keys_file}:\n  {text.splitlines()[-1]}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    """Print a new gateway key once and its line; with --append, add it like ``keys add``."""
    if args.append is not None:
        args.keys_file = args.append
        return _add(args)
    now, key = keysfile.utc_now(), new_key()
    name = check_name(args.name)
    line = KeyLine(name, key_digest(key), created(now), _expires(args, now), _teams(args) or ())
    _print_key(name, key)
    print(f"keys file line (add it to the keys file):\n  {line.text()}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    now, key = keysfile.utc_now(), new_key()
    keys = KeysFile.read(args.keys_file)
    text = keysfile.rotate(
        keys, args.name, key, now,
        overlap=args.overlap, expires=_expires(args, now), teams=_teams(args),
    )  # fmt: skip
    keys.write(text)
    _print_key(args.name, key)
    until = format_time(now + args.overlap)
    print(f"{args.name}'s other keys in {args.keys_file} work until {until} at the latest")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    keys = KeysFile.read(args.keys_file)
    text, count = keysfile.revoke(keys, args.name, args.key)
    keys.write(text)
    print(f"revoked {count} key(s) of {args.name} in {args.keys_file}")
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = keysfile.listing(KeysFile.read(args.keys_file), keysfile.utc_now())
    header = ("NAME", "KEY ID", "CREATED", "EXPIRES", "TEAMS")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _print_key(name: str, key: str) -> None:
    print(f"gateway key for {name} (give it to them; it is not stored anywhere):\n  {key}")
