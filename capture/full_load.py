"""The full load: mapped tables read inside one consistent snapshot and written as DMS full-load files.

Used by the capture (first run, and a table mapped later) and by the re-snapshot job. Every row carries the
snapshot's binlog position with its ordinal in primary-key order as its change sequence, so it sorts before every
change committed after the snapshot, and a repeated full load of the same snapshot gives the same sequences.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pymysql

from capture.columns import UnsupportedColumn
from capture.sink import S3Store, TableBuffer, parquet_bytes
from capture.source_tables import CaptureError, SourceTable, read_columns
from cdc.landing import commit_timestamp_text, load_file_key
from cdc.mappings import TableMapping, quote_mysql
from cdc.progress import Progress
from cdc.sequence import BinlogPosition
from cdc.source import MySQLConnection, begin_consistent_snapshot

log = logging.getLogger("cdc.capture")

LOAD_FILE_ROWS = 100_000


@dataclass
class Snapshot:
    """What a full load did: the snapshot's binlog position and GTID state, and per source table its shape, the
    files written and their rows. Tables that could not be read are in `errors` (unless the load was strict)."""

    cluster: str
    position: BinlogPosition
    gtid: str
    tables: dict[str, SourceTable] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    zero_dates: int = 0
    errors: list[str] = field(default_factory=list)


def full_load(
    cluster: str,
    connection: MySQLConnection,
    store: S3Store,
    tables: list[TableMapping],
    *,
    keep_previous_loads: bool = False,
    strict: bool = False,
    report_progress: Callable[[str], None] = log.info,
    load_file_rows: int = LOAD_FILE_ROWS,
) -> Snapshot:
    """Full load of `tables` from one consistent snapshot. The capture replaces a table's earlier LOAD files; with
    `keep_previous_loads` (a re-snapshot) they stay and the new files are numbered after them. A table that cannot
    be read is recorded in `errors` and skipped, or with `strict` raises."""
    server = connection.connect(cursorclass=pymysql.cursors.SSCursor)
    try:
        with server.cursor() as cursor:
            position = begin_consistent_snapshot(cursor)
            if position is None:
                raise CaptureError(
                    f"cluster {cluster}: the server reports no binlog_snapshot_file; the capture needs MariaDB "
                    "(use AWS DMS for MySQL/Aurora sources)"
                )
            cursor.execute("SELECT BINLOG_GTID_POS(%s, %s)", (position.file, position.pos))
            snapshot = Snapshot(cluster, position, cursor.fetchone()[0] or "")
        for table in tables:
            try:
                shape = SourceTable(table, read_columns(server, table, cluster))
            except (CaptureError, UnsupportedColumn) as exc:
                if strict:
                    raise
                snapshot.errors.append(str(exc))
                continue
            snapshot.tables[table.source] = shape
            _load_table(server, shape, store, snapshot, keep_previous_loads, report_progress, load_file_rows)
        server.commit()
    finally:
        server.close()
    log.info("cluster %s: snapshot at %s:%s (gtid %s)", cluster, position.file, position.pos, snapshot.gtid)
    return snapshot


def _load_table(
    server: Any,
    shape: SourceTable,
    store: S3Store,
    snapshot: Snapshot,
    keep_previous: bool,
    report_progress: Callable[[str], None],
    load_file_rows: int,
) -> None:
    mapping, position = shape.mapping, snapshot.position
    schema, name = mapping.source_schema, mapping.source_table
    started = time.monotonic()
    first_number = store.last_load_number(schema, name) if keep_previous else 0
    if not keep_previous:
        store.delete_load_files(schema, name)
    written = snapshot.files[mapping.source] = []
    stamp = commit_timestamp_text(dt.datetime.now(dt.UTC))
    progress = Progress(f"full load of {mapping.source} (rows)", _row_estimate(server, mapping))
    metadata = {
        "cdc.cluster": snapshot.cluster,
        "cdc.first_position": f"{position.file}:{position.pos}",
        "cdc.last_position": f"{position.file}:{position.pos}",
    }
    total = 0
    with server.cursor() as cursor:
        cursor.execute(_select_sql(shape))
        while True:
            batch = cursor.fetchmany(load_file_rows)
            if not batch and written:
                break
            buffer = TableBuffer(schema, name, shape.columns)
            for offset, row in enumerate(
                batch
            ):  # each row: the snapshot's position and its ordinal in key order
                values, zero_dates = shape.normalise(row, None)
                snapshot.zero_dates += zero_dates
                buffer.rows.append(("I", stamp, *values, position.sequence(total + offset)))
            total += len(batch)
            key = load_file_key(store.prefix, schema, name, first_number + len(written) + 1)
            written.append(key)
            store.put_file(key, parquet_bytes(buffer.to_arrow(), metadata))
            report_progress(progress.advance(len(batch)))
            if not batch:
                break
    snapshot.rows[mapping.source] = total
    log.info(
        "full load of %s: %d rows in %d file(s), %.1f s",
        mapping.source,
        total,
        len(written),
        time.monotonic() - started,
    )


def _select_sql(shape: SourceTable) -> str:
    """The full load's SELECT: every column (TIME as MySQL's text: its range fits no time type), in key order."""
    mapping = shape.mapping
    columns = ", ".join(
        f"CAST({_column(c.name)} AS CHAR)" if c.data_type == "time" else _column(c.name)
        for c in shape.columns
    )
    order = ", ".join(quote_mysql(k) for k in mapping.primary_key)
    source = f"{quote_mysql(mapping.source_schema)}.{quote_mysql(mapping.source_table)}"
    return f"SELECT {columns} FROM {source}" + (f" ORDER BY {order}" if order else "")  # noqa: S608


def _column(name: str) -> str:
    """A source column name quoted for MySQL (any name MySQL allows; the loader names those BigQuery refuses)."""
    return "`" + name.replace("`", "``") + "`"


def _row_estimate(server: Any, mapping: TableMapping) -> int | None:
    """InnoDB's row estimate, for progress (read before the full load's result stream opens)."""
    with server.cursor() as cursor:
        cursor.execute(
            "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (mapping.source_schema, mapping.source_table),
        )
        estimate = cursor.fetchone()
    return int(estimate[0] or 0) if estimate else None
