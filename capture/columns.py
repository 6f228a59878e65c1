"""Source column definitions -> Parquet types and exact values, as DMS writes them, minus DMS's and the binlog
reader's mistakes.

A `ColumnSpec` is built from information_schema (`COLUMN_TYPE` such as `tinyint(1)`, `bigint(20) unsigned`,
`set('a','b')`) or, for a binlog event older than the current schema, synthesised from the event's table map.
The Parquet type comes from the definition (never from Python values); `normalise` turns whatever the binlog
reader or PyMySQL produced into that type's exact value:

| MySQL                 | Parquet                  | normalisation                                                  |
|-----------------------|--------------------------|----------------------------------------------------------------|
| BIT(1) / BIT(n)       | bool / binary            | reader gives '0'/'1' strings ('0' is truthy), PyMySQL bytes    |
| TINYINT(1)            | int8 (bool by override)  | kept as int unless the mapping says BOOL                       |
| *INT [UNSIGNED]       | int8..64 / uint8..64     | BIGINT UNSIGNED max stays exact                                |
| DECIMAL(p,s)          | decimal128/256(p,s)      | exact Decimal                                                  |
| DATE/DATETIME         | date32 / timestamp[us]   | zero and partial-zero dates -> NULL, counted                   |
| TIMESTAMP             | timestamp[us, UTC]       | zero TIMESTAMP (reader: 1970-01-01 00:00:00) -> NULL, counted  |
| TIME(n)               | string '-HH:MM:SS[.f]'   | MySQL's TIME range does not fit any time type; exact text      |
| SET                   | string 'a,b' ('' = empty)| reader gives a Python set, and None for an empty SET           |
| ENUM, CHAR, TEXT      | string                   | utf8mb4 kept                                                   |
| BINARY/BLOB           | binary                   | reader gives '' (str) for an empty value -> b''; BINARY(n)   |
|                       |                          | loses its trailing 0x00 padding in the binlog -> re-padded     |
| JSON                  | string (JSON text)       | MariaDB: text; MySQL: parsed -> re-serialised                  |
| YEAR                  | int16                    | zero year 0000: reader gives 1900 -> 0, as a SELECT gives it   |
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from typing import Any

import pyarrow as pa

INTEGER_TYPES = {"tinyint": 8, "smallint": 16, "mediumint": 32, "int": 32, "integer": 32, "bigint": 64}
STRING_TYPES = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext", "enum"}
BINARY_TYPES = {"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"}
ZERO_TIMESTAMP = dt.datetime(1970, 1, 1)  # what the binlog reader returns for TIMESTAMP '0000-00-00 00:00:00'
BINLOG_ZERO_YEAR = 1900  # what the binlog reader returns for YEAR 0000

OVERRIDE_TYPES: dict[str, pa.DataType] = {
    "BOOL": pa.bool_(),
    "INT64": pa.int64(),
    "NUMERIC": pa.decimal128(38, 9),
    "BIGNUMERIC": pa.decimal256(76, 38),
    "FLOAT64": pa.float64(),
    "STRING": pa.string(),
    "BYTES": pa.binary(),
    "DATE": pa.date32(),
    "DATETIME": pa.timestamp("us"),
    "TIME": pa.string(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "JSON": pa.string(),
}


class UnsupportedColumn(ValueError):
    """A source column whose type the capture cannot represent exactly."""


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    column_type: str  # information_schema.COLUMNS.COLUMN_TYPE, lower case, e.g. "decimal(18,4)"
    nullable: bool = True
    override: str | None = None  # BigQuery type from the mapping's type_overrides

    @cached_property
    def data_type(self) -> str:
        return re.match(r"[a-z]+", self.column_type).group(0)  # type: ignore[union-attr]

    @cached_property
    def unsigned(self) -> bool:
        return " unsigned" in self.column_type

    @cached_property
    def length(self) -> int | None:
        match = re.match(r"[a-z]+\((\d+)", self.column_type)
        return int(match.group(1)) if match else None

    @cached_property
    def scale(self) -> int:
        match = re.match(r"[a-z]+\(\d+,(\d+)\)", self.column_type)
        return int(match.group(1)) if match else 0

    @cached_property
    def members(self) -> list[str]:
        return [m.replace("''", "'") for m in re.findall(r"'((?:[^']|'')*)'", self.column_type)]

    def arrow_type(self) -> pa.DataType:
        if self.override:
            return OVERRIDE_TYPES[self.override]
        return self.natural_arrow_type()

    def natural_arrow_type(self) -> pa.DataType:
        kind = self.data_type
        if kind in INTEGER_TYPES:
            bits = INTEGER_TYPES[kind]
            return pa.uint64() if bits == 64 and self.unsigned else _int_type(bits, self.unsigned)
        if kind == "bit":
            return pa.bool_() if (self.length or 1) == 1 else pa.binary()
        if kind in ("decimal", "numeric"):
            precision = self.length or 10
            return (
                pa.decimal128(precision, self.scale)
                if precision <= 38
                else pa.decimal256(precision, self.scale)
            )
        if kind == "float":
            return pa.float32()
        if kind in ("double", "real"):
            return pa.float64()
        if kind == "date":
            return pa.date32()
        if kind == "datetime":
            return pa.timestamp("us")
        if kind == "timestamp":
            return pa.timestamp("us", tz="UTC")
        if kind == "year":
            return pa.int16()
        if kind in STRING_TYPES or kind in ("set", "time", "json"):
            return pa.string()
        if kind in BINARY_TYPES:
            return pa.binary()
        raise UnsupportedColumn(
            f"column {self.name} has type {self.column_type}, which the capture cannot represent exactly; "
            "map it with a type override (e.g. STRING or BYTES) or exclude the table"
        )

    def normaliser(self) -> Callable[[Any, str], Any] | None:
        """(value, none_source) -> exact value of `arrow_type()`; none_source says why the reader gave None.

        None when both readers already give the exact value (integers, floats, DECIMAL as Decimal).
        """
        natural = _normaliser(self)
        if not self.override:
            return None if natural is _identity else natural
        convert = _override_converter(self.override)
        return lambda value, none_source: _apply(convert, natural(value, none_source))

    @cached_property
    def temporal(self) -> bool:
        return self.data_type in ("date", "datetime", "timestamp")

    def zero_date(self, value: Any, none_source: str) -> bool:
        """Whether (value, none_source) is a zero or partial-zero date that became NULL."""
        if self.data_type not in ("date", "datetime", "timestamp"):
            return False
        if value is None:
            return none_source.startswith("out of")  # the reader's OUT_OF_DATE(TIME)_RANGE
        return isinstance(value, str) or (self.data_type == "timestamp" and value == ZERO_TIMESTAMP)


def _identity(value: Any, _none_source: str) -> Any:
    return value


def _int_type(bits: int, unsigned: bool) -> pa.DataType:
    return getattr(pa, f"{'u' if unsigned else ''}int{bits}")()


def _apply(convert: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else convert(value)


def _override_converter(override: str) -> Callable[[Any], Any]:
    if override == "BOOL":
        return lambda v: bool(v) if not isinstance(v, str) else v not in ("", "0", "false")
    if override == "INT64":
        return int
    if override in ("STRING", "JSON", "TIME"):
        return _text
    if override == "FLOAT64":
        return float
    if override in ("NUMERIC", "BIGNUMERIC"):
        return lambda v: Decimal(v)
    return lambda v: v


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, Decimal):
        return format(value, "f")  # plain digits: str() gives '0E-10' or '1.000E-7' for small values
    return str(value)


def _normaliser(spec: ColumnSpec) -> Callable[[Any, str], Any]:
    kind = spec.data_type
    if kind == "bit":
        width = spec.length or 1
        if width == 1:
            return lambda v, _: None if v is None else _bit_int(v) != 0
        nbytes = (width + 7) // 8
        return lambda v, _: None if v is None else _bit_int(v).to_bytes(nbytes, "big")
    if kind == "set":
        # The reader returns None for an empty SET; its none_source tells it apart from NULL.
        def set_value(v: Any, none_source: str) -> str | None:
            if v is None:
                return "" if none_source == "empty set" or not spec.nullable else None
            if isinstance(v, (set, frozenset)):
                return ",".join(m for m in spec.members if m in v)  # definition order, as MySQL prints it
            return str(v)

        return set_value
    if kind in ("date", "datetime", "timestamp"):

        def temporal(v: Any, none_source: str) -> Any:
            if v is None or spec.zero_date(v, none_source):
                return None
            if kind == "date" and isinstance(v, dt.datetime):
                return v.date()
            if kind == "timestamp":
                return v.replace(tzinfo=dt.UTC) if v.tzinfo is None else v.astimezone(dt.UTC)
            return v

        return temporal
    if kind == "time":
        fsp = spec.length or 0
        return lambda v, _: None if v is None else format_time(v, fsp)
    if kind == "binary":
        # BINARY(n) is stored padded with 0x00; the binlog row image drops the trailing zeros: restore them.
        width = spec.length or 1
        return lambda v, _: None if v is None else _as_bytes(v).ljust(width, b"\x00")
    if kind in BINARY_TYPES:
        return lambda v, _: None if v is None else _as_bytes(v)
    if kind == "json":
        return lambda v, _: (
            None
            if v is None
            else v
            if isinstance(v, str)
            else v.decode()
            if isinstance(v, bytes)
            else json.dumps(v, ensure_ascii=False)
        )
    if kind in ("decimal", "numeric"):
        return lambda v, _: v if v is None or isinstance(v, Decimal) else Decimal(v)
    if kind == "year":
        # YEAR stores one byte, year - 1900 (1901..2155) or 0 for the zero year 0000; the binlog reader adds 1900
        # to every byte, so its 1900 (not a YEAR value) is the zero year, which a SELECT gives as 0.
        return lambda v, _: 0 if v == BINLOG_ZERO_YEAR else v
    if kind in STRING_TYPES:
        return lambda v, _: None if v is None else (v.decode("utf-8") if isinstance(v, bytes) else v)
    return _identity


def _as_bytes(value: Any) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def _bit_int(value: Any) -> int:
    if isinstance(value, str):  # binlog reader: '0'/'1' characters
        return int(value, 2) if value else 0
    if isinstance(value, (bytes, bytearray)):  # PyMySQL
        return int.from_bytes(value, "big")
    return int(value)


def format_time(value: Any, fsp: int) -> str:
    """MySQL's own text for a TIME value, e.g. '-00:00:00.000001' or '838:59:59' (hours may exceed 24)."""
    if isinstance(value, str):
        return value
    micros_total = round(value.total_seconds() * 1_000_000) if isinstance(value, dt.timedelta) else int(value)
    sign = "-" if micros_total < 0 else ""
    micros_total = abs(micros_total)
    seconds, micros = divmod(micros_total, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{sign}{hours:02d}:{minutes:02d}:{secs:02d}"
    if fsp:
        text += "." + f"{micros:06d}"[:fsp]
    return text


def spec_from_table_map(column: Any, nullable: bool = True) -> ColumnSpec:
    """A ColumnSpec synthesised from a binlog table-map column (used only when information_schema has moved on)."""
    from pymysqlreplication.constants import FIELD_TYPE

    t = column.type
    unsigned = " unsigned" if getattr(column, "unsigned", False) else ""
    simple = {
        FIELD_TYPE.TINY: "tinyint",
        FIELD_TYPE.SHORT: "smallint",
        FIELD_TYPE.INT24: "mediumint",
        FIELD_TYPE.LONG: "int",
        FIELD_TYPE.LONGLONG: "bigint",
        FIELD_TYPE.FLOAT: "float",
        FIELD_TYPE.DOUBLE: "double",
        FIELD_TYPE.YEAR: "year",
        FIELD_TYPE.DATE: "date",
        FIELD_TYPE.NEWDATE: "date",
        FIELD_TYPE.JSON: "json",
    }
    if t in simple:
        column_type = simple[t] + (unsigned if simple[t] in INTEGER_TYPES else "")
    elif t == FIELD_TYPE.NEWDECIMAL:
        column_type = f"decimal({column.precision},{column.decimals})"
    elif t == FIELD_TYPE.BIT:
        column_type = f"bit({column.bits})"
    elif t in (FIELD_TYPE.TIME, FIELD_TYPE.TIME2):
        column_type = f"time({getattr(column, 'fsp', 0)})"
    elif t in (FIELD_TYPE.DATETIME, FIELD_TYPE.DATETIME2):
        column_type = "datetime"
    elif t in (FIELD_TYPE.TIMESTAMP, FIELD_TYPE.TIMESTAMP2):
        column_type = "timestamp"
    elif t == FIELD_TYPE.ENUM or getattr(column, "enum_values", None):
        column_type = "enum(" + ",".join(f"'{v}'" for v in column.enum_values or []) + ")"
    elif t == FIELD_TYPE.SET or getattr(column, "set_values", None):
        column_type = "set(" + ",".join(f"'{v}'" for v in column.set_values or []) + ")"
    elif t == FIELD_TYPE.STRING and getattr(column, "character_set_name", None) == "binary":
        column_type = f"binary({column.max_length})"  # fixed width: the binlog drops its 0x00 padding
    elif t in (FIELD_TYPE.VARCHAR, FIELD_TYPE.STRING, FIELD_TYPE.VAR_STRING, FIELD_TYPE.BLOB):
        binary = getattr(column, "character_set_name", None) in (None, "binary")
        column_type = (
            ("varbinary" if binary else "varchar") if t != FIELD_TYPE.BLOB else ("blob" if binary else "text")
        )
    else:
        raise UnsupportedColumn(f"column {column.name}: binlog type code {t} is not supported")
    return ColumnSpec(name=column.name, column_type=column_type, nullable=nullable)


# the binlog's type families: a column whose information_schema type is in another family than its table-map type
# was retyped after the event was logged
_FAMILIES = {
    "integer": "int",
    "numeric": "decimal",
    "real": "double",
    **dict.fromkeys(("char", "varchar", "binary", "varbinary"), "string"),
    **dict.fromkeys(
        ("tinytext", "text", "mediumtext", "longtext", "json", "tinyblob", "mediumblob", "longblob"), "blob"
    ),
}


def _family(data_type: str) -> str:
    return _FAMILIES.get(data_type, data_type)


_TABLE_MAP_ATTRIBUTES = (
    "unsigned", "precision", "decimals", "bits", "fsp", "max_length", "character_set_name",
)  # fmt: skip


def table_map_signature(columns: Any) -> tuple[Any, ...]:
    """What a binlog table map says of each column that can change its values' type or normalisation: name, type
    code, signedness, DECIMAL precision/scale, BIT width, fractions, width, character set, ENUM/SET members. Two
    events with one signature decode alike, so the capture re-reads a table's columns only when it changes."""
    return tuple(
        (
            column.name,
            column.type,
            *(getattr(column, name, None) for name in _TABLE_MAP_ATTRIBUTES),
            tuple(getattr(column, "enum_values", None) or ()),
            tuple(getattr(column, "set_values", None) or ()),
        )
        for column in columns
    )


def agrees_with_table_map(spec: ColumnSpec, column: Any) -> bool:
    """Whether values of a binlog table-map `column` are exactly representable by `spec` as it is normalised:
    same type family, signedness, DECIMAL precision and scale, BIT width, TIME fractions, BINARY width, ENUM/SET
    members and binary-or-text (each compared where the table map carries it)."""
    try:
        logged = spec_from_table_map(column)
    except UnsupportedColumn:
        return True  # the table map cannot say better than information_schema
    kind = spec.data_type
    if _family(kind) != _family(logged.data_type):
        return False
    if kind in INTEGER_TYPES and getattr(column, "unsigned", None) is not None:
        return spec.unsigned == bool(column.unsigned)
    if kind in ("decimal", "numeric"):
        return (spec.length or 10, spec.scale) == (logged.length, logged.scale)
    if kind == "bit":
        return (spec.length or 1) == logged.length
    if kind == "time":
        return (spec.length or 0) == (getattr(column, "fsp", None) or 0)
    if kind == "enum":  # the reader puts '' (the invalid value, index 0) before an ENUM's members
        members = getattr(column, "enum_values", None)
        return members is None or list(members)[1:] == spec.members
    if kind == "set":
        members = getattr(column, "set_values", None)
        return members is None or list(members) == spec.members
    if _family(kind) in ("string", "blob") and getattr(column, "character_set_name", None) is not None:
        if (kind in BINARY_TYPES) != (column.character_set_name == "binary"):
            return False
        if kind == "binary" and getattr(column, "max_length", None) is not None:
            return spec.length == column.max_length
    return True
