"""Corrections to mysql-replication 1.0.17's row decoding, applied once at import of the capture.

TIME2 (MySQL 5.6+/MariaDB temporal format): the reader negates only the integer part of a negative value and adds
the fractional part unsigned, so '-00:00:00.000001' decodes as -0.999999 s. This replaces the decoder with
MySQL's own algorithm (sql-common/my_time.c: my_time_packed_from_binary, TIME_from_longlong_time_packed).

DATE: an invalid date stored under `ALLOW_INVALID_DATES` (`2026-02-30`) made the reader raise ValueError, which
stopped the capture at that row; it is now no date (None, "out of date range"), as DATETIME2's decoder already
treats one, so it lands as NULL counted with the zero dates - as the full load's SELECT gives it.

Speed (the reader's hottest column types on the seed's wide tables): DECIMAL, DATETIME2 and TIMESTAMP2's
fraction are decoded from one read of their whole binary form with `int.from_bytes` and shifts, instead of the
reader's reads per group, push-back of the sign byte and a string built per 9-digit group. Same values, same `Decimal` exponents
(tests/test_units.py compares both decoders over edge and random values). See docs/design.md, "Capture".
"""

from __future__ import annotations

import datetime as dt
import struct
from decimal import Decimal
from functools import cache
from typing import Any

from pymysqlreplication.constants import BINLOG, FIELD_TYPE, NONE_SOURCE
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


DIGITS_PER_GROUP = 9
GROUP_BASE = 10**DIGITS_PER_GROUP
BYTES_FOR_DIGITS = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4)  # MySQL's dig2bytes: bytes of a leftover group of n digits


DecimalLayout = tuple[int, tuple[tuple[int, int, int], ...], int]


@cache
def decimal_layout(precision: int, scale: int) -> DecimalLayout:
    """The binary form of DECIMAL(precision, scale): (its size in bytes, the (shift, mask, base) of each digit
    group from the most significant, counted from the value's last bit, and how many groups form the integer part).
    The integer part is a leftover group of (precision - scale) % 9 digits followed by full 9-digit groups of
    4 bytes; the fraction full groups followed by a leftover of scale % 9 digits (sql-common/decimal.c)."""
    integral = precision - scale
    groups: list[tuple[int, int]] = []  # (bytes, base) from the most significant
    if integral % DIGITS_PER_GROUP:
        groups.append((BYTES_FOR_DIGITS[integral % DIGITS_PER_GROUP], 10 ** (integral % DIGITS_PER_GROUP)))
    groups += [(4, GROUP_BASE)] * (integral // DIGITS_PER_GROUP)
    integer_groups = len(groups)
    groups += [(4, GROUP_BASE)] * (scale // DIGITS_PER_GROUP)
    if scale % DIGITS_PER_GROUP:
        groups.append((BYTES_FOR_DIGITS[scale % DIGITS_PER_GROUP], 10 ** (scale % DIGITS_PER_GROUP)))
    size = sum(width for width, _ in groups)
    layout, position = [], size * 8
    for width, base in groups:
        position -= width * 8
        layout.append((position, (1 << (width * 8)) - 1, base))
    return size, tuple(layout), integer_groups


def decode_decimal(raw: bytes, precision: int, scale: int) -> Decimal:
    """Decode a DECIMAL's binary form: the sign is the first bit (set for >= 0); a negative value has every
    byte inverted."""
    return _decode_decimal(raw, decimal_layout(precision, scale), scale)


def _decode_decimal(raw: bytes, layout: DecimalLayout, scale: int) -> Decimal:
    size, groups, integer_groups = layout
    bits = size * 8
    number = int.from_bytes(raw, "big") ^ (1 << (bits - 1))
    negative = not raw[0] & 0x80
    if negative:
        number ^= (1 << bits) - 1
    integer = fraction = 0
    for index, (shift, mask, base) in enumerate(groups):
        group = (number >> shift) & mask
        if index < integer_groups:
            integer = integer * base + group
        else:
            fraction = fraction * base + group
    sign = "-" if negative else ""
    return Decimal(f"{sign}{integer}.{fraction:0{scale}d}" if scale else f"{sign}{integer}")


def microseconds(raw: bytes, fsp: int) -> int:
    """The fractional seconds of a temporal value: (fsp + 1) // 2 big-endian bytes holding fsp digits rounded up
    to an even count (an odd fsp's last digit is 0)."""
    if not raw:
        return 0
    stored = int.from_bytes(raw, "big")
    return (stored // 10 if fsp % 2 else stored) * 10 ** (6 - fsp)


def decode_datetime2(raw: bytes, fsp: int) -> dt.datetime | None:
    """Decode DATETIME2: 1 sign bit, 17 bits year*13+month, 5 day, 5 hour, 6 minute, 6 second, then the fraction.
    A zero or invalid date is no date (None), as the reader's own decoder gives it."""
    packed = int.from_bytes(raw[:5], "big")
    year, month = divmod((packed >> 22) & 0x1FFFF, 13)
    try:
        return dt.datetime(
            year,
            month,
            (packed >> 17) & 0x1F,
            (packed >> 12) & 0x1F,
            (packed >> 6) & 0x3F,
            packed & 0x3F,
            microseconds(raw[5:], fsp),
        )
    except ValueError:
        return None


def decode_timestamp2(raw: bytes, fsp: int) -> dt.datetime:
    """Decode TIMESTAMP2: big-endian signed seconds since the epoch, then the fraction; naive UTC, as the reader."""
    value = dt.datetime.utcfromtimestamp(int.from_bytes(raw[:4], "big", signed=True))
    fraction = microseconds(raw[4:], fsp)
    return value.replace(microsecond=fraction) if fraction else value


def _read_new_decimal(self: Any, column: Any) -> Decimal:
    layout = decimal_layout(column.precision, column.decimals)
    return _decode_decimal(self.packet.read(layout[0]), layout, column.decimals)


def _read_datetime2(self: Any, column: Any) -> dt.datetime | None:
    fsp = column.fsp or 0
    return decode_datetime2(self.packet.read(5 + (fsp + 1) // 2), fsp)


def _read_fsp(self: Any, column: Any) -> int:
    fsp = column.fsp or 0
    return microseconds(self.packet.read((fsp + 1) // 2), fsp) if fsp else 0


# --------------------------------------------------------------------------------------------------------------
# A row image: the common column types decoded in one loop, the others by the reader's own dispatch
# --------------------------------------------------------------------------------------------------------------

_FIXED_WIDTH = {  # struct formats the reader uses; an unsigned integer's is the upper-case letter
    FIELD_TYPE.TINY: "b",
    FIELD_TYPE.SHORT: "h",
    FIELD_TYPE.LONG: "i",
    FIELD_TYPE.LONGLONG: "q",
    FIELD_TYPE.FLOAT: "f",
    FIELD_TYPE.DOUBLE: "d",
}
_FIXED, _DECIMAL, _DATETIME2, _TIMESTAMP2, _STRING, _ENUM, _OTHER = range(7)
RowPlan = tuple[tuple[str, int, Any, Any], ...]  # (name, kind, kind's argument, column) per column


def _column_plan(column: Any) -> tuple[int, Any]:
    """How one column's value is read: (kind, its argument)."""
    fsp_bytes = ((getattr(column, "fsp", 0) or 0) + 1) // 2
    if column.type in _FIXED_WIDTH:
        letter = _FIXED_WIDTH[column.type]
        unpack = struct.Struct("<" + (letter.upper() if column.unsigned and letter in "bhiq" else letter))
        return _FIXED, (unpack.size, unpack.unpack)
    if column.type == FIELD_TYPE.NEWDECIMAL:
        return _DECIMAL, decimal_layout(column.precision, column.decimals)
    if column.type == FIELD_TYPE.DATETIME2:
        return _DATETIME2, 5 + fsp_bytes
    if column.type == FIELD_TYPE.TIMESTAMP2:
        return _TIMESTAMP2, 4 + fsp_bytes
    if column.type == FIELD_TYPE.ENUM and column.enum_values and column.size in (1, 2):
        return _ENUM, (column.size, column.enum_values)
    if column.type in (FIELD_TYPE.VARCHAR, FIELD_TYPE.STRING):
        return _STRING, 2 if column.max_length > 255 else 1
    if column.type == FIELD_TYPE.BLOB:
        return _STRING, column.length_size
    return _OTHER, None


def row_plan(event: Any) -> RowPlan | None:
    """How to decode a row image of the event's table, built once per table definition; None when a column has
    no name (the reader then looks the names up itself)."""
    table = event.table_map[event.table_id]
    cached = table.__dict__.get("_cdc_row_plan")
    if cached is None:
        named = all(column.name for column in event.columns)
        cached = tuple((c.name, *_column_plan(c), c) for c in event.columns) if named else ()
        table.__dict__["_cdc_row_plan"] = cached
    return cached or None


def _read_column_data(self: Any, cols_bitmap: bytes, row_image_type: Any = None) -> dict[str, Any]:
    """A full row image (binlog_row_image=FULL: every column present) of a table whose columns are named, outside
    MySQL's partial JSON updates; anything else goes to the reader's own loop."""
    plan = row_plan(self) if self.event_type != BINLOG.PARTIAL_UPDATE_ROWS_EVENT else None
    count = len(self.columns)
    if plan is None or cols_bitmap != _all_present(count):
        return STOCK_DECODERS["_read_column_data"](self, cols_bitmap, row_image_type)
    packet = self.packet
    read = packet.read
    none_sources = self._RowsEvent__none_sources
    null_bitmap = read((count + 7) >> 3)
    values: dict[str, Any] = {}
    for index, (name, kind, argument, column) in enumerate(plan):
        if null_bitmap[index >> 3] & (1 << (index & 7)):
            none_sources[name] = NONE_SOURCE.NULL
            values[name] = None
        elif kind == _FIXED:
            values[name] = argument[1](read(argument[0]))[0]
        elif kind == _STRING:
            values[name] = self._RowsEvent__read_string(argument, column)
        elif kind == _DECIMAL:
            values[name] = _decode_decimal(read(argument[0]), argument, column.decimals)
        elif kind == _DATETIME2:
            value = decode_datetime2(read(argument), column.fsp or 0)
            if value is None:
                none_sources[name] = NONE_SOURCE.OUT_OF_DATETIME2_RANGE
            values[name] = value
        elif kind == _TIMESTAMP2:
            values[name] = decode_timestamp2(read(argument), column.fsp or 0)
        elif kind == _ENUM:
            values[name] = argument[1][int.from_bytes(read(argument[0]), "little")]
        else:
            values[name] = self._RowsEvent__read_values_name(
                column, null_bitmap, index, False, cols_bitmap, column.unsigned, index
            )
    return values


@cache
def _all_present(count: int) -> bytes:
    """The columns-present bitmap of a full row image of `count` columns."""
    return ((1 << count) - 1).to_bytes((count + 7) // 8, "little")


PATCHES: dict[str, Any] = {
    "_RowsEvent__read_time2": _read_time2,
    "_RowsEvent__read_date": _read_date,
    "_RowsEvent__read_new_decimal": _read_new_decimal,
    "_RowsEvent__read_datetime2": _read_datetime2,
    "_RowsEvent__read_fsp": _read_fsp,  # TIMESTAMP2's fraction (its seconds are read inline by the reader)
    "_read_column_data": _read_column_data,
}
STOCK_DECODERS: dict[str, Any] = {name: RowsEvent.__dict__[name] for name in PATCHES}  # the reader's own


def apply() -> None:
    for name, decoder in PATCHES.items():
        setattr(RowsEvent, name, decoder)


apply()
