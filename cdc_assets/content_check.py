"""`content_matches_source`: every compared column's value equal at the source and in BigQuery, not only the row
count. Both sides compute the same digest in their own SQL - MySQL/MariaDB on the source inside a consistent
snapshot, BigQuery on the current state rolled back to that snapshot's binlog position (the row-count check's
boundary, so a steady load is no false alarm) - per chunk: a day of `partition_column`, else a range of an integer
primary key (a window of ranges per run on big tables), else one of 16 buckets of the key's hash. A mismatched chunk
is drilled into for the first differing keys and columns. Rules per type and what a check reads: docs/design.md,
"Checks"; docs/types.md lists each type's normalised text.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.cloud import bigquery

from capture.columns import BINARY_TYPES, INTEGER_TYPES, STRING_TYPES, ColumnSpec
from capture.source_tables import read_columns
from cdc.mappings import ClusterMapping, TableMapping, quote_mysql
from cdc_assets.targets import Q_CHANGE_SEQ, Q_OP, TableTargets, quote_column

CONTENT = "content_matches_source"
CHUNK_KEYS = 100_000  # key values per chunk of an integer primary key
HASH_BUCKETS = 16  # chunks of a table without an integer key or a partition column
DRILL_CHUNKS = 3  # mismatched chunks listed key by key
DRILL_MAX_ROWS = 200_000  # a chunk larger than this is named, not listed
FIRST_KEYS = 5

APPROXIMATE = ("float", "double", "real")


@dataclass(frozen=True)
class ColumnDigest:
    """One column's normalised text: the same string from the source's value and from BigQuery's."""

    name: str
    mysql: str
    bigquery: str


def _mysql_trim(expr: str) -> str:
    """A decimal's text without trailing fractional zeros: 1.50 -> 1.5, 100.00 -> 100 (both servers agree)."""
    return f"IF(LOCATE('.', {expr}) > 0, TRIM(TRAILING '.' FROM TRIM(TRAILING '0' FROM {expr})), {expr})"


def _bigquery_trim(expr: str) -> str:
    return f"IF(STRPOS({expr}, '.') > 0, RTRIM(RTRIM({expr}, '0'), '.'), {expr})"


def column_digest(spec: ColumnSpec, bigquery_type: str | None) -> ColumnDigest | str:
    """The column's digest, or why it is not compared. `bigquery_type` None: the column is not in BigQuery (a
    column added at the source that no change has carried yet) - compared as NULL, so its values show up."""
    m, b = quote_mysql(spec.name), quote_column(spec.name)
    kind = spec.data_type
    if kind in APPROXIMATE:
        return "approximate type (FLOAT/DOUBLE): its text differs between servers; not compared"
    bq_type = {"INTEGER": "INT64", "BOOLEAN": "BOOL", "FLOAT": "FLOAT64"}.get(
        bigquery_type or "", bigquery_type
    )

    def on_bigquery(by_type: dict[str, str]) -> str | None:
        if bq_type is None:
            return "CAST(NULL AS STRING)"
        return by_type.get(bq_type or "")

    mysql: str
    bq: str | None
    if kind in INTEGER_TYPES or kind == "year":
        mysql = f"CAST({m} + 0 AS CHAR)"
        if spec.override == "BOOL":
            mysql = f"IF({m} IS NULL, NULL, IF({m} <> 0, '1', '0'))"
        bq = on_bigquery(
            {
                "INT64": f"CAST({b} AS STRING)",
                "BOOL": f"CAST(CAST({b} AS INT64) AS STRING)",
                "NUMERIC": _bigquery_trim(f"CAST({b} AS STRING)"),
                "BIGNUMERIC": _bigquery_trim(f"CAST({b} AS STRING)"),
                "STRING": b,
            }
        )
    elif kind == "bit":
        width = spec.length or 1
        if width == 1 or spec.override == "BOOL":
            mysql = f"IF({m} IS NULL, NULL, IF({m} + 0 <> 0, '1', '0'))"
            bq = on_bigquery({"BOOL": f"CAST(CAST({b} AS INT64) AS STRING)"})
        else:
            mysql = f"LPAD(HEX({m} + 0), {2 * ((width + 7) // 8)}, '0')"
            bq = on_bigquery({"BYTES": f"UPPER(TO_HEX({b}))"})
    elif kind in ("decimal", "numeric"):
        mysql = _mysql_trim(f"CAST({m} AS CHAR)")
        text = _bigquery_trim(f"CAST({b} AS STRING)")
        bq = on_bigquery({"NUMERIC": text, "BIGNUMERIC": text, "STRING": _bigquery_trim(b)})
    elif kind == "date":
        # DATE_ADD(.., INTERVAL 0 DAY) is NULL for a zero, partial-zero or invalid (ALLOW_INVALID_DATES) date: the
        # capture lands each of them as NULL
        mysql = f"CAST(DATEDIFF(DATE_ADD({m}, INTERVAL 0 DAY), '1970-01-01') AS CHAR)"
        bq = on_bigquery({"DATE": f"CAST(UNIX_DATE({b}) AS STRING)"})
    elif kind in ("datetime", "timestamp"):  # the session is in UTC (begin_consistent_snapshot)
        mysql = (
            f"CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', DATE_ADD({m}, INTERVAL 0 DAY)) AS CHAR)"
        )
        bq = on_bigquery(
            {
                "DATETIME": f"CAST(UNIX_MICROS(TIMESTAMP({b})) AS STRING)",
                "TIMESTAMP": f"CAST(UNIX_MICROS({b}) AS STRING)",
            }
        )
    elif kind in ("time", "json"):
        mysql = f"CONVERT(CAST({m} AS CHAR) USING utf8mb4)"
        bq = on_bigquery({"STRING": b})
    elif kind in STRING_TYPES or kind == "set":
        mysql = f"CONVERT({m} USING utf8mb4)"  # any character set -> the UTF-8 BigQuery holds
        bq = on_bigquery({"STRING": b})
    elif kind in BINARY_TYPES:
        mysql = f"HEX({m})"
        bq = on_bigquery({"BYTES": f"UPPER(TO_HEX({b}))"})
    else:
        return f"type {spec.column_type} has no content rule; not compared"
    if bq is None:
        return f"{spec.column_type} held as BigQuery {bigquery_type} (a type override) has no content rule"
    return ColumnDigest(spec.name, mysql, bq)


def _mysql_row_text(digests: Iterable[ColumnDigest]) -> str:
    # every part in one explicit collation: columns of other collations cannot clash in CONCAT
    parts = [
        f"COALESCE(CONVERT({d.mysql} USING utf8mb4), CHAR(30 USING utf8mb4)) COLLATE utf8mb4_bin"
        for d in digests
    ]
    return f"CONCAT({', CHAR(31 USING utf8mb4), '.join(parts)})" if len(parts) > 1 else parts[0]


def _bigquery_row_text(digests: Iterable[ColumnDigest]) -> str:
    parts = [f"COALESCE({d.bigquery}, CODE_POINTS_TO_STRING([30]))" for d in digests]
    return f"CONCAT({', CODE_POINTS_TO_STRING([31]), '.join(parts)})" if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class Chunking:
    """How rows are grouped into chunks (the same groups on both sides) and which rows a run compares."""

    mysql_chunk: str
    bigquery_chunk: str
    mysql_scope: str  # a WHERE condition
    bigquery_scope: str
    description: str


def chunking_for(
    table: TableMapping,
    specs: dict[str, ColumnSpec],
    key_digests: list[ColumnDigest],
    key_range: tuple[int, int] | None,
    max_rows: int,
    now: float,
    key_type: str | None = None,
    rotation_seconds: float = 600,
) -> Chunking:
    if table.partition_column:
        days = check_days()
        since, until = days[0].isoformat(), (days[-1] + dt.timedelta(days=1)).isoformat()
        m, b = quote_mysql(table.partition_column), quote_column(table.partition_column)
        return Chunking(
            f"CAST(DATE({m}) AS CHAR)",
            f"CAST(DATE({b}) AS STRING)",
            f"{m} >= '{since}' AND {m} < '{until}'",
            f"DATE({b}) >= DATE '{since}' AND DATE({b}) < DATE '{until}'",
            f"{table.partition_column} days {days[0]}..{days[-1]}",
        )
    first = table.primary_key[0] if table.primary_key else None
    if first and specs[first].data_type in INTEGER_TYPES and key_range is not None:
        m, b = quote_mysql(first), quote_column(first)
        low, high = key_range
        window = max(CHUNK_KEYS, max_rows // CHUNK_KEYS * CHUNK_KEYS)
        first_chunk = math.floor(low / CHUNK_KEYS) * CHUNK_KEYS
        windows = max(1, math.ceil((high + 1 - first_chunk) / window))
        # a different window each cycle of the table checks (each table is checked once per cycle)
        start = first_chunk + int(now // rotation_seconds) % windows * window
        scope = ("TRUE", "TRUE") if windows == 1 else (f"{m} >= {start} AND {m} < {start + window}",) * 2
        return Chunking(
            f"CAST({m} DIV {CHUNK_KEYS} AS CHAR)",  # both truncate toward zero
            f"CAST(DIV({b}, {CHUNK_KEYS}) AS STRING)"
            if key_type in ("INTEGER", "INT64")
            else f"CAST(CAST(TRUNC({b} / {CHUNK_KEYS}) AS INT64) AS STRING)",  # NUMERIC: BIGINT UNSIGNED
            scope[0],
            scope[1],
            f"{first} in chunks of {CHUNK_KEYS:,} values"
            + ("" if windows == 1 else f", window {start}..{start + window - 1} (1 of {windows})"),
        )
    keyed = key_digests
    return Chunking(
        f"CAST(CONV(SUBSTR(MD5({_mysql_row_text(keyed)}), 1, 1), 16, 10) AS CHAR)",
        f"CAST(CAST(CONCAT('0x', SUBSTR(TO_HEX(MD5({_bigquery_row_text(keyed)})), 1, 1)) AS INT64) AS STRING)",
        "TRUE",
        "TRUE",
        f"{HASH_BUCKETS} buckets of the {'key' if table.primary_key else 'row'}'s hash (whole table)",
    )


def check_days() -> list[dt.date]:
    """The days the per-day checks compare: yesterday and today (UTC)."""
    today = dt.datetime.now(dt.UTC).date()
    return [today - dt.timedelta(days=1), today]


@dataclass
class ChunkDigest:
    rows: int
    sum: int
    xor: int


@dataclass
class SideDigest:
    chunks: dict[str, ChunkDigest] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks.values())


def _aggregate_sql(row_text: str, chunk: str, hexed: str, to_int: str) -> tuple[str, str]:
    """(inner select list, outer aggregate list) for a digest per chunk."""
    inner = f"{chunk} AS chunk, {hexed.format(row_text)} AS h"
    outer = (
        f"chunk, COUNT(*) AS n, SUM({to_int.format('SUBSTR(h, 1, 8)')}) AS s, "
        f"BIT_XOR({to_int.format('SUBSTR(h, 9, 15)')}) AS x"
    )
    return inner, outer


MYSQL_HEX = "MD5({})"
MYSQL_INT = "CAST(CONV({}, 16, 10) AS UNSIGNED)"
BIGQUERY_HEX = "TO_HEX(MD5({}))"
BIGQUERY_INT = "CAST(CONCAT('0x', {}) AS INT64)"


class BigQueryState:
    """SQL for the BigQuery current state rolled back to a change sequence boundary, and queries on it."""

    def __init__(self, targets: TableTargets, table: TableMapping, columns: list[str], boundary: str):
        self.targets, self.table, self.boundary = targets, table, boundary
        self.bytes_processed = 0
        cols = ", ".join(quote_column(c) for c in columns) or "1 AS _none"
        changelog = targets.ref(targets.changelog)
        if not table.primary_key:  # append-only: the changes up to the boundary are the content
            self.sql = f"SELECT {cols} FROM {changelog} WHERE {Q_CHANGE_SEQ} <= @boundary"
            return
        keys = [quote_column(k) for k in table.primary_key]
        same = " AND ".join(f"l.{k} = s.{k}" for k in keys)
        later = f"SELECT DISTINCT {', '.join(keys)} FROM {changelog} WHERE {Q_CHANGE_SEQ} > @boundary"
        self.sql = (
            f"SELECT {cols} FROM {targets.ref(targets.current)} AS s WHERE NOT EXISTS "
            f"(SELECT 1 FROM ({later}) AS l WHERE {same}) "
            f"UNION ALL SELECT {cols} FROM (SELECT * FROM {changelog} AS s WHERE {Q_CHANGE_SEQ} <= @boundary "
            f"AND {Q_CHANGE_SEQ} >= {targets.horizon_sql()} AND EXISTS (SELECT 1 FROM ({later}) AS l WHERE {same}) "
            f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {', '.join(keys)} ORDER BY {Q_CHANGE_SEQ} DESC) = 1) "
            f"WHERE {Q_OP} != 'D'"
        )

    def query(self, select: str, chunk: str | None = None) -> list[Any]:
        """Rows of `select` over the rolled-back state (a CTE named `state`; `@chunk` bound to `chunk`)."""
        sql = f"WITH state AS ({self.sql}) {select}"
        params = [bigquery.ScalarQueryParameter("boundary", "STRING", self.boundary)]
        if chunk is not None:
            params.append(bigquery.ScalarQueryParameter("chunk", "STRING", chunk))
        config = bigquery.QueryJobConfig(query_parameters=params)
        job = self.targets.bq.query(sql, job_config=config)
        rows = list(job.result())
        self.bytes_processed += int(job.total_bytes_processed or 0)
        return rows


def _digest(rows: Iterable[Any]) -> SideDigest:
    side = SideDigest()
    for chunk, n, s, x in rows:
        side.chunks[str(chunk)] = ChunkDigest(int(n), int(s or 0), int(x or 0))
    return side


@dataclass
class ContentComparison:
    chunking: str
    source: SideDigest
    bigquery: SideDigest
    compared: list[str]
    skipped: dict[str, str]
    differing: list[str] = field(default_factory=list)  # "id=2: columns y, u" / "id=7: only at the source"
    bytes_processed: int = 0

    @property
    def mismatched_chunks(self) -> list[str]:
        names = sorted(set(self.source.chunks) | set(self.bigquery.chunks))
        return [c for c in names if self.source.chunks.get(c) != self.bigquery.chunks.get(c)]


def compare_content(
    cursor: Any,
    targets: TableTargets,
    cluster: ClusterMapping,
    table: TableMapping,
    boundary: str,
    max_rows: int,
    rotation_seconds: float = 600,
) -> ContentComparison:
    """Digests of both sides (the cursor is inside the source's consistent snapshot; BigQuery is rolled back to
    `boundary`), and for mismatched chunks the first differing keys and columns."""
    specs = read_columns(cursor.connection, table, cluster.cluster)
    by_name = {s.name: s for s in specs}
    schema = {f.name: f.field_type for f in targets.bq.get_table(targets.table_id(targets.current)).schema}
    digests: list[ColumnDigest] = []
    skipped: dict[str, str] = {}
    for spec in specs:
        digest = column_digest(spec, schema.get(spec.name))
        if isinstance(digest, str):
            skipped[spec.name] = digest
        else:
            digests.append(digest)
    key_names = table.primary_key or [d.name for d in digests]
    key_digests = [d for d in digests if d.name in key_names]
    key_range = None
    if table.primary_key and by_name[table.primary_key[0]].data_type in INTEGER_TYPES:
        first = quote_mysql(table.primary_key[0])
        ref = f"{quote_mysql(table.source_schema)}.{quote_mysql(table.source_table)}"
        cursor.execute(f"SELECT MIN({first}), MAX({first}) FROM {ref}")
        low, high = cursor.fetchone()
        key_range = (int(low), int(high)) if low is not None else (0, 0)
    key_type = schema.get(table.primary_key[0]) if table.primary_key else None
    chunking = chunking_for(
        table, by_name, key_digests, key_range, max_rows, time.time(), key_type, rotation_seconds
    )

    ref = f"{quote_mysql(table.source_schema)}.{quote_mysql(table.source_table)}"
    inner, outer = _aggregate_sql(_mysql_row_text(digests), chunking.mysql_chunk, MYSQL_HEX, MYSQL_INT)
    cursor.execute(
        f"SELECT {outer} FROM (SELECT {inner} FROM {ref} WHERE {chunking.mysql_scope}) AS d GROUP BY chunk"
    )
    source = _digest(cursor.fetchall())

    present = [d.name for d in digests if d.name in schema]
    state = BigQueryState(targets, table, present, boundary)
    inner, outer = _aggregate_sql(
        _bigquery_row_text(digests), chunking.bigquery_chunk, BIGQUERY_HEX, BIGQUERY_INT
    )
    rows = state.query(
        f"SELECT {outer} FROM (SELECT {inner} FROM state WHERE {chunking.bigquery_scope}) GROUP BY chunk"
    )
    result = ContentComparison(
        chunking.description,
        source,
        _digest(tuple(r.values()) for r in rows),
        [d.name for d in digests],
        skipped,
    )
    for chunk in result.mismatched_chunks[:DRILL_CHUNKS]:
        sizes = [side.chunks[chunk].rows for side in (source, result.bigquery) if chunk in side.chunks]
        if max(sizes) > DRILL_MAX_ROWS:
            result.differing.append(f"chunk {chunk}: {max(sizes):,} rows, too many to list its keys")
            continue
        result.differing.extend(_differing_keys(cursor, ref, state, chunking, chunk, digests, key_digests))
        if len(result.differing) >= FIRST_KEYS:
            break
    result.bytes_processed = state.bytes_processed
    return result


def _differing_keys(
    cursor: Any,
    ref: str,
    state: BigQueryState,
    chunking: Chunking,
    chunk: str,
    digests: list[ColumnDigest],
    key_digests: list[ColumnDigest],
) -> list[str]:
    """The first differing keys of a chunk, each with the columns that differ (or the side it is missing from)."""
    names = [d.name for d in key_digests]
    mysql_columns = ", ".join(f"{d.mysql} AS {quote_mysql('c' + str(i))}" for i, d in enumerate(digests))
    cursor.execute(
        f"SELECT {mysql_columns} FROM {ref} WHERE {chunking.mysql_scope} AND {chunking.mysql_chunk} = %s",
        (chunk,),
    )
    source_rows = [tuple(row) for row in cursor.fetchall()]
    bigquery_columns = ", ".join(f"{d.bigquery} AS c{i}" for i, d in enumerate(digests))
    rows = state.query(
        f"SELECT {bigquery_columns} FROM state WHERE {chunking.bigquery_scope} AND {chunking.bigquery_chunk} = @chunk",
        chunk,
    )
    bigquery_rows = [tuple(r.values()) for r in rows]
    key_at = [i for i, d in enumerate(digests) if d.name in names]

    def by_key(rows: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], list[tuple[Any, ...]]]:
        out: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        for row in rows:
            out.setdefault(tuple(row[i] for i in key_at), []).append(row)
        return out

    at_source, in_bigquery = by_key(source_rows), by_key(bigquery_rows)
    found = []
    for key in sorted(set(at_source) | set(in_bigquery), key=str):
        label = ", ".join(f"{n}={v}" for n, v in zip(names, key, strict=True))
        label = label if len(label) <= 120 else label[:117] + "..."
        left, right = at_source.get(key, []), in_bigquery.get(key, [])
        if sorted(left, key=str) == sorted(right, key=str):
            continue
        if not right:
            found.append(f"{label}: only at the source")
        elif not left:
            found.append(f"{label}: only in BigQuery")
        elif len(left) != len(right):
            found.append(f"{label}: {len(left)} row(s) at the source, {len(right)} in BigQuery")
        else:
            columns = [d.name for i, d in enumerate(digests) if left[0][i] != right[0][i]]
            found.append(f"{label}: column(s) {', '.join(columns)} differ")
        if len(found) >= FIRST_KEYS:
            break
    return found
