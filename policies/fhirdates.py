"""FHIR date, dateTime and instant values as ranges of integer microseconds (UTC).

A FHIR date is a range: `2020` is all of 2020, `2020-03-04T10:00` the whole minute.
Searches compare ranges (see `search.py`), so both indexed values and search values
become `(low, high)` with `high` the last microsecond inside the range. A value without
a time zone is taken as UTC.
"""
from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta

#: Open ends of a Period (no start, no end) sort before and after every real instant.
MIN_US = -(2**62)
MAX_US = 2**62

_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class DateFormatError(ValueError):
    """Not a FHIR date, dateTime or instant."""


def _us(dt: datetime) -> int:
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def date_range(value: str) -> tuple[int, int]:
    """The (low, high) microsecond range a FHIR date/dateTime/instant string covers."""
    match = _DATE.match(value)
    if not match:
        raise DateFormatError(f"{value!r} is not a FHIR date or dateTime")
    g = match.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            start, end = datetime(year, 1, 1), datetime(year + 1, 1, 1) if year < 9999 else None
        elif g["d"] is None:
            month = int(g["m"])
            start = datetime(year, month, 1)
            end = start + timedelta(days=calendar.monthrange(year, month)[1])
        elif g["H"] is None:
            start = datetime(year, int(g["m"]), int(g["d"]))
            end = start + timedelta(days=1)
        else:
            fraction = (g["f"] or "")[:6]
            start = datetime(year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"] or 0),
                             int(fraction.ljust(6, "0")) if fraction else 0)
            if g["f"]:
                step = timedelta(microseconds=10 ** (6 - len(fraction)))
            elif g["S"] is not None:
                step = timedelta(seconds=1)
            else:
                step = timedelta(minutes=1)
            end = start + step
    except ValueError as exc:
        raise DateFormatError(f"{value!r} is not a valid date: {exc}") from exc
    except OverflowError:  # the last range of 9999 runs to the end of time, as the year 9999 does
        end = None
    offset = timedelta(0)
    tz = g["tz"]
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        offset = sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
    low = _us(start.replace(tzinfo=UTC) - offset)
    high = MAX_US if end is None else _us(end.replace(tzinfo=UTC) - offset) - 1
    return low, high


def instant(us: int) -> str:
    """Render microseconds since the epoch as a FHIR instant (UTC, millisecond precision kept)."""
    dt = _EPOCH + timedelta(microseconds=us)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}"[:3] + "Z"
