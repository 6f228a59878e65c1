"""The oracle: the source's own rendering of every value (MySQL SQL), and the same rendering of what landed in
Parquet or BigQuery, so the two compare value for value - the tests and the benchmark judge correctness by it.

`oracle_expression` renders a source column as text in SQL; `as_text` renders a Parquet/BigQuery value the same
way (zero dates become NULL, as DMS does; BIT and binary as hex; JSON by content; floats by repr).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

from cdc.landing import ADDED_COLUMNS, CHANGE_SEQUENCE_COLUMN, COMMIT_TIMESTAMP_COLUMN, OP_COLUMN, TRUNCATE_OP
from cdc.mappings import quote_mysql

BINARY_TYPES = ("binary", "varbinary", "blob", "tinyblob", "mediumblob", "longblob")


def as_text(value: Any, column_type: str) -> str | None:
    """A Parquet or BigQuery value rendered the way MySQL renders the source value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, bytes):
        return value.hex().upper()
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dt.datetime):
        fsp = int(column_type.split("(")[1].rstrip(")")) if "(" in column_type else 0
        text = value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value
        rendered = text.strftime("%Y-%m-%d %H:%M:%S")
        return rendered + ("." + f"{text.microsecond:06d}"[:fsp] if fsp else "")
    if isinstance(value, dt.date):
        return value.isoformat()
    return json_canonical(str(value))


def json_canonical(text: str) -> str:
    """JSON documents compare by content (MariaDB keeps the text as written); other text is left alone."""
    if text[:1] in ("{", "["):
        try:
            return json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False)
        except ValueError:
            return text
    return text


def oracle_expression(name: str, column_type: str) -> str:
    """SQL that renders a source column as text comparable with `as_text` (zero dates become NULL, as DMS does)."""
    kind = column_type.split("(")[0].split()[0]
    col = f"`{name}`"
    if kind == "bit":
        width = int(column_type.split("(")[1].rstrip(")"))
        return (
            f"CAST({col} + 0 AS CHAR)" if width == 1 else f"LPAD(HEX({col}), {2 * ((width + 7) // 8)}, '0')"
        )
    if kind in BINARY_TYPES:
        return f"HEX({col})"
    if kind == "year":
        return f"CAST({col} + 0 AS CHAR)"  # YEAR is a number (the zero year 0000 is 0), as it lands
    if kind in ("date", "datetime", "timestamp"):
        return f"IF(CAST({col} AS CHAR) LIKE '0000%' OR CAST({col} AS CHAR) LIKE '%-00%', NULL, CAST({col} AS CHAR))"
    return f"CAST({col} AS CHAR)"


def same(expected: Any, actual: Any) -> bool:
    """Equal text, or equal numbers written differently (NUMERIC 7.000000000 and '7')."""
    if expected == actual:
        return True
    try:
        return Decimal(str(expected)) == Decimal(str(actual))
    except (InvalidOperation, TypeError):
        return False


PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def key_text(value: Any) -> str:
    """A key value as text, whichever side it comes from (NUMERIC 7.000000000 and '7' are the same key). Only plain
    decimal numbers are numbers: text such as '9e4999' (an append-only table keyed by all its columns) stays text."""
    text = format(value, "f") if isinstance(value, Decimal) else str(value)
    if not PLAIN_NUMBER.fullmatch(text):
        return text
    number = Decimal(text)
    return str(int(number)) if number == number.to_integral_value() else str(number.normalize())


def source_columns(cursor: Any, schema: str, table: str) -> dict[str, str]:
    """name -> lower-case column type, in column order."""
    cursor.execute(
        "SELECT COLUMN_NAME, LOWER(COLUMN_TYPE) FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
        (schema, table),
    )
    return dict(cursor.fetchall())


def source_rows(
    cursor: Any, schema: str, table: str, key: list[str]
) -> tuple[dict[tuple[str, ...], dict[str, Any]], dict[str, str]]:
    """The source table as the oracle renders it: (rows by key text, column types). The cursor's session must be
    in UTC (`SET SESSION time_zone = '+00:00'`)."""
    types = source_columns(cursor, schema, table)
    cursor.execute(
        "SELECT "
        + ", ".join(oracle_expression(n, t) for n, t in types.items())
        + f" FROM {quote_mysql(schema)}.{quote_mysql(table)}"
    )
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for values in cursor.fetchall():
        row = dict(zip(types, values, strict=True))
        for name, column_type in types.items():
            if isinstance(row[name], str):
                row[name] = json_canonical(row[name])
            if row[name] is not None and column_type.split("(")[0] in ("double", "float"):
                row[name] = repr(float(row[name]))
        rows[tuple(key_text(row[k]) for k in key)] = row
    return rows, types


def rendered_rows(
    rows: Iterable[Any], types: dict[str, str], key: list[str]
) -> dict[tuple[str, ...], dict[str, Any]]:
    """BigQuery (or Parquet) rows rendered by the oracle, by key text: comparable with `source_rows`."""
    rendered = {}
    for row in rows:
        values = {n: as_text(row[n], t) for n, t in types.items()}
        rendered[tuple(key_text(values[k]) for k in key)] = values
    return rendered


def differences(
    expected: dict[tuple[str, ...], dict[str, Any]], actual: dict[tuple[str, ...], dict[str, Any]]
) -> dict[str, Any]:
    """Missing, extra and different rows (the first of each kind named), value for value."""
    different = [
        (k, n, expected[k][n], actual[k].get(n))
        for k in sorted(expected.keys() & actual.keys())
        for n in expected[k]
        if not same(expected[k][n], actual[k].get(n))
    ]
    return {
        "missing": sorted(expected.keys() - actual.keys()),
        "extra": sorted(actual.keys() - expected.keys()),
        "different_rows": len({d[0] for d in different}),
        "first_differences": different[:5],
    }


def final_state(rows: list[dict[str, Any]], key: list[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Landed changes applied in change-sequence order (replayed duplicates collapse), as the loader does."""
    state: dict[tuple[Any, ...], dict[str, Any]] = {}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r[CHANGE_SEQUENCE_COLUMN], r[OP_COLUMN] != "D")):
        identity = (row[CHANGE_SEQUENCE_COLUMN], row[OP_COLUMN])
        payload = {k: v for k, v in row.items() if k not in ("_key", COMMIT_TIMESTAMP_COLUMN)}
        if identity in seen:
            assert seen[identity] == payload, f"replayed change differs: {seen[identity]} vs {payload}"
            continue
        seen[identity] = payload
        pk = tuple(row[c] for c in key)
        if row[OP_COLUMN] == TRUNCATE_OP:  # every row whose last change precedes it is gone
            state.clear()
        elif row[OP_COLUMN] == "D":
            state.pop(pk, None)
        else:
            state[pk] = {k: v for k, v in payload.items() if k not in ADDED_COLUMNS}
    return state
