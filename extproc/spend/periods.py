"""Calendar periods in the configured time zone: a day, an ISO week (from Monday), a month.

Boundaries are local midnights, so a daily budget resets at midnight where the
organisation is, and a month is a calendar month however long it is.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from extproc.config.spend import Period

PERIODS = (Period.DAY, Period.WEEK, Period.MONTH)  # the index of each in the trackers' arrays


class Calendar:
    def __init__(self, timezone: str) -> None:
        self.zone = ZoneInfo(timezone)

    def bounds(self, period: Period, at: float) -> tuple[float, float]:
        """The start and end (seconds since the epoch) of the ``period`` holding ``at``."""
        local = datetime.fromtimestamp(at, self.zone)
        day = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
        if period is Period.DAY:
            start, end = day, day + timedelta(days=1)
        elif period is Period.WEEK:
            start = day - timedelta(days=day.weekday())
            end = start + timedelta(days=7)
        else:
            start = day.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
        # Wall-clock arithmetic then re-read in the zone: a DST change keeps midnight midnight.
        return _epoch(start, self.zone), _epoch(end, self.zone)

    def iso(self, at: float) -> str:
        return datetime.fromtimestamp(at, self.zone).isoformat()


def _epoch(local: datetime, zone: ZoneInfo) -> float:
    return local.replace(tzinfo=zone).timestamp()
