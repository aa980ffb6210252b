"""Positions in a stream as operators type them: an entry id or a point in time.

Accepted forms:

- an entry id: ``MS`` or ``MS-SEQ`` (``1714557600000``, ``1714557600000-3``);
- ``-`` (the start of the stream) and ``+`` (its end);
- an ISO-8601 time with a timezone: ``2024-05-01T10:00:00Z``, ``2024-05-01T12:00+02:00``
  (a time without a timezone is refused: it would silently mean the host's zone);
- a date alone, ``2024-05-01``, meaning midnight UTC;
- a duration ago: ``90s``, ``15m``, ``2h``, ``7d`` (or ``15m ago``).

Every parse error is a :class:`ValueError` whose message names the bad value; the CLI
turns it into a usage error naming the argument.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from streams.parse import normalize_id

_ID = re.compile(r"^\d+(-\d+)?$")
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])(?:\s+ago)?$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
MAX_SEQ = 18446744073709551615


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """A timezone-aware datetime from ISO-8601, a bare date (UTC) or a duration ago."""
    text = value.strip()
    ago = _AGO.match(text.lower())
    if ago:
        amount, unit = float(ago.group(1)), _UNITS[ago.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: amount})
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither an entry id (MS or MS-SEQ) nor a time "
            "(ISO-8601 like 2024-05-01T10:00:00Z, or a duration ago like 15m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no timezone; add one (Z or +HH:MM)")
    return moment


def parse_position(value: str, *, end: bool = False, now: datetime | None = None) -> str:
    """An entry id for ``value`` (an id, ``-``/``+``, or a time).

    A time or a bare ``MS`` id as an ``end`` position covers the whole millisecond
    (``MS-<max seq>``), so ``--to`` is inclusive; as a start it is ``MS-0``.
    """
    text = value.strip()
    if text in ("-", "+"):
        return text
    if _ID.match(text):
        if end and "-" not in text:
            return f"{int(text)}-{MAX_SEQ}"
        return normalize_id(text)
    ms = int(parse_time(text, now=now).timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"{value!r} is before 1970")
    return f"{ms}-{MAX_SEQ}" if end else f"{ms}-0"


def position_ms(value: str, *, now: datetime | None = None) -> int:
    """Milliseconds since the epoch for an id or a time (for ``--since`` filters)."""
    position = parse_position(value, now=now)
    if position == "-":
        return 0
    if position == "+":
        raise ValueError(f"{value!r} is not a point in time")
    return int(position.partition("-")[0])


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of an entry id (``-`` first, ``+`` last)."""
    if entry_id == "-":
        return (-1, 0)
    if entry_id == "+":
        return (1 << 64, 0)
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
