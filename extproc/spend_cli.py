"""The ``spend`` command: totals for a period from the ledger, or one client's budgets.

``spend CONFIG`` prints this month's totals by client; ``--by team|model|paid_by``,
``--period day|week``, or ``--from``/``--to`` (ISO dates or times, in the
configured zone) choose others; ``--format csv|json`` for machines.
``spend CONFIG --client NAME`` prints used and remaining per budget and when each resets.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from extproc.config.load import load_config
from extproc.config.spend import Period
from extproc.policy.secrets import SecretError
from extproc.spend.database import DatabaseError
from extproc.spend.periods import Calendar
from extproc.spend.report import GROUPS, client_budgets, totals
from extproc.spend.service import open_database


def register(commands: Any) -> None:
    text = "spend in USD from the ledger: totals by client, team, model or payer; budgets"
    command = commands.add_parser("spend", help=text, description=__doc__)
    command.add_argument("config", type=Path, help="the gateway YAML")
    command.add_argument("--by", choices=GROUPS, default="client")
    command.add_argument("--period", choices=[p.value for p in Period], default="month")
    command.add_argument(
        "--from", dest="start", help="start (ISO date or time; default: the period's)"
    )
    command.add_argument("--to", dest="end", help="end, exclusive (default: the period's end)")
    command.add_argument("--client", help="show this client's budgets: used, remaining, reset")
    command.add_argument("--format", choices=["table", "csv", "json"], default="table")
    command.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    spend = load_config(args.config).spend
    if spend is None:
        print(f"{args.config}: no spend section: nothing is priced or kept", file=sys.stderr)
        return 2
    calendar = Calendar(spend.timezone)
    try:
        db = open_database(spend)
        try:
            if args.client:
                rows = [dataclasses.asdict(line) for line in client_budgets(spend, db, args.client)]
            else:
                start, end = _window(calendar, args)
                rows = [dataclasses.asdict(t) for t in totals(db, start, end, args.by)]
        finally:
            db.close()
    except (DatabaseError, SecretError, ValueError) as exc:
        print(f"spend: {exc}", file=sys.stderr)
        return 2
    _print(rows, args.format)
    return 0


def _window(calendar: Calendar, args: argparse.Namespace) -> tuple[float, float]:
    now = datetime.now(calendar.zone).timestamp()
    start, end = calendar.bounds(Period(args.period), now)
    if args.start:
        start = _when(calendar, args.start, "--from")
    if args.end:
        end = _when(calendar, args.end, "--to")
    return start, end


def _when(calendar: Calendar, text: str, option: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{option}: expected an ISO date or time, like 2026-12-01") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=calendar.zone)).timestamp()


def _text(value: object) -> str:
    if isinstance(value, Decimal):
        return f"{value:.6f}"
    if isinstance(value, Period):
        return value.value
    return str(value)


def _print(rows: list[dict[str, Any]], style: str) -> None:
    if style == "json":
        json.dump(
            [
                {k: _text(v) if isinstance(v, Decimal | Period) else v for k, v in r.items()}
                for r in rows
            ],
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return
    if not rows:
        print("no requests in the ledger for this period" if style == "table" else "")
        return
    header = list(rows[0])
    cells = [[_text(r[k]) for k in header] for r in rows]
    if style == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(cells)
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    for line in [header, *cells]:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
