"""Corrections to mysql-replication 1.0.17's row decoding, applied once at import of the capture.

TIME2 (MySQL 5.6+/MariaDB temporal format): the reader negates only the integer part of a negative value and adds
the fractional part unsigned, so '-00:00:00.000001' decodes as -0.999999 s. This replaces the decoder with
MySQL's own algorithm (sql-common/my_time.c: my_time_packed_from_binary, TIME_from_longlong_time_packed).

DATE: an invalid date stored under `ALLOW_INVALID_DATES` (`2026-02-30`) made the reader raise ValueError, which
stopped the capture at that row; it is now no date (None, "out of date range"), as DATETIME2's decoder already
treats one, so it lands as NULL counted with the zero dates - as the full load's SELECT gives it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymysqlreplication.row_event import RowsEvent

TIMEF_INT_OFS = 0x800000
TIMEF_OFS = 0x800000000000


def decode_time2(raw: bytes, fsp: int) -> dt.timedelta:
    """Decode a TIME2 value (3 bytes + (fsp+1)//2 fractional bytes, big endian) exactly."""
    if fsp in (0,):
        packed = (int.from_bytes(raw[:3], "big") - TIMEF_INT_OFS) << 24
    elif fsp in (1, 2):
        intpart = int.from_bytes(raw[:3], "big") - TIMEF_INT_OFS
        frac = raw[3]
        if intpart < 0 and frac:
            intpart += 1
            frac -= 0x100
        packed = (intpart << 24) + frac * 10000
    elif fsp in (3, 4):
        intpart = int.from_bytes(raw[:3], "big") - TIMEF_INT_OFS
        frac = int.from_bytes(raw[3:5], "big")
        if intpart < 0 and frac:
            intpart += 1
            frac -= 0x10000
        packed = (intpart << 24) + frac * 100
    else:
        packed = int.from_bytes(raw[:6], "big") - TIMEF_OFS
    negative = packed < 0
    packed = abs(packed)
    hms, micros = packed >> 24, packed % (1 << 24)
    hours, minutes, seconds = (hms >> 12) % (1 << 10), (hms >> 6) % (1 << 6), hms % (1 << 6)
    value = dt.timedelta(hours=hours, minutes=minutes, seconds=seconds, microseconds=micros)
    return -value if negative else value


def _read_time2(self: Any, column: Any) -> dt.timedelta:
    fsp = getattr(column, "fsp", 0) or 0
    return decode_time2(self.packet.read(3 + (fsp + 1) // 2), fsp)


def _read_date(self: Any) -> dt.date | None:
    packed = self.packet.read_uint24()
    year, month, day = packed >> 9, (packed >> 5) & 0x0F, packed & 0x1F
    if not (year and month and day):  # zero and partial-zero dates
        return None
    try:
        return dt.date(year, month, day)
    except ValueError:  # an invalid date (ALLOW_INVALID_DATES)
        return None


def apply() -> None:
    RowsEvent._RowsEvent__read_time2 = _read_time2  # type: ignore[attr-defined]
    RowsEvent._RowsEvent__read_date = _read_date  # type: ignore[attr-defined]


apply()
