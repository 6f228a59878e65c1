"""The two ways users copy MySQL tables to BigQuery without CDC, run on the same source in the same benchmark.

- `daily`: the seed's predecessor, a daily batch. Every mapped table is copied whole: SELECT -> Parquet -> one load
  job (WRITE_TRUNCATE) per table.
- `incremental`: a scheduled incremental copy on a cursor column, as dlt's `sql_database` source with
  `incremental(...)`, Sling or Airbyte do it: every interval, each table's rows with cursor >= the last value seen
  are loaded and MERGEd by primary key. The cursor is `updated_at` where the table has one, else `created_at` (new
  rows only), else the auto-increment `id` (new rows only); a table with none of them is copied whole each time.

Both write each value as the text MySQL renders for it (no type mapping work at all, which flatters them) and a
hash of the whole source row (`_src_hash`), so the benchmark can tell at the end which rows a copy lacks, which it
still holds after they were deleted, and which it holds stale. `_peer_loaded_at` is when the row was loaded; for a
cursor copy `_changed_at` is the cursor's time, so each row it holds has a measured latency.

dlt itself is not used: its BigQuery destination cannot be pointed at a local BigQuery API server, so the same
technique is written here plainly (`python -m bench.peers daily|incremental ...`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions
from google.cloud import bigquery

from cdc.clients import bigquery_client_from
from cdc.mappings import ClusterMapping, TableMapping, load_mappings, quote_bigquery, quote_mysql
from cdc.settings import Settings
from cdc.source import cluster_connection
from cdc_testing.oracle import oracle_expression

CURSOR_COLUMNS = ("updated_at", "created_at", "id")


@dataclass
class PeerTable:
    cluster: ClusterMapping
    table: TableMapping
    columns: dict[str, str]  # name -> MySQL column type
    primary_key: list[str]
    cursor: str | None
    last: Any = None  # the cursor's highest value copied so far

    @property
    def source(self) -> str:
        return f"{quote_mysql(self.table.source_schema)}.{quote_mysql(self.table.source_table)}"

    def row_hash(self) -> str:
        """MD5 of the row's text as MySQL renders it (the same expression at copy time and at the end)."""
        parts = ", ".join(f"IFNULL({oracle_expression(n, t)}, '<null>')" for n, t in self.columns.items())
        return f"MD5(CONCAT_WS('|', {parts}))"

    def select(self, where: str = "") -> str:
        values = ", ".join(f"{oracle_expression(n, t)} AS {quote_mysql(n)}" for n, t in self.columns.items())
        cursor = f", {quote_mysql(self.cursor)} AS _cursor" if self.cursor else ""
        return f"SELECT {values}, {self.row_hash()} AS _src_hash{cursor} FROM {self.source} {where}"


def describe(connection: Any, cluster: ClusterMapping, table: TableMapping) -> PeerTable:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT COLUMN_NAME, LOWER(COLUMN_TYPE) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
            "AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (table.source_schema, table.source_table),
        )
        columns = {str(n): str(t) for n, t in cursor.fetchall()}
        cursor.execute(
            "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s "
            "AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
            (table.source_schema, table.source_table),
        )
        key = [str(row[0]) for row in cursor.fetchall()]
    cursor_column = next((c for c in CURSOR_COLUMNS if c in columns), None)
    return PeerTable(cluster, table, columns, key, cursor_column)


@dataclass
class CopyStats:
    runs: list[dict[str, Any]] = field(default_factory=list)
    load_jobs: int = 0
    query_jobs: int = 0
    bytes_loaded: int = 0
    rows_copied: int = 0


class Peer:
    """A copy of every mapped table into `<prefix>_<dataset>` datasets."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.mappings = load_mappings()
        config = Settings.load()
        self.bq = bigquery_client_from(config)
        self.tables: list[PeerTable] = []
        for cluster in self.mappings.clusters:
            connection = cluster_connection(cluster, config).connect()
            try:
                self.tables += [describe(connection, cluster, t) for t in cluster.enabled_tables]
            finally:
                connection.close()
        self.stats = CopyStats()

    def dataset(self, table: TableMapping) -> str:
        return f"{self.prefix}_{table.target_dataset}"

    def ref(self, table: TableMapping, suffix: str = "") -> str:
        return quote_bigquery(self.bq.project, self.dataset(table), table.target_table + suffix)

    def _rows(self, peer: PeerTable, where: str = "", params: tuple[Any, ...] = ()) -> pa.Table:
        connection = cluster_connection(peer.cluster, Settings.load()).connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET SESSION time_zone = '+00:00'")
                if params:  # the oracle SQL holds % signs: escaped where the driver formats parameters in
                    cursor.execute(peer.select().replace("%", "%%") + " " + where, params)
                else:
                    cursor.execute(peer.select(where))
                names = [d[0] for d in cursor.description]
                rows = cursor.fetchall()
        finally:
            connection.close()
        columns: dict[str, Any] = {}
        for index, name in enumerate(names):
            values = [row[index] for row in rows]
            if name == "_cursor":
                if values and max(values) is not None:
                    peer.last = max(v for v in values if v is not None)
                if peer.cursor in ("updated_at", "created_at"):
                    columns["_changed_at"] = pa.array(
                        [v.replace(tzinfo=dt.UTC) if v else None for v in values],
                        pa.timestamp("us", tz="UTC"),
                    )
                continue
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
        columns["_peer_loaded_at"] = pa.array(
            [dt.datetime.now(dt.UTC)] * len(rows), pa.timestamp("us", tz="UTC")
        )
        return pa.table(columns)

    def _load(self, data: pa.Table, destination: str, disposition: str) -> None:
        buffer = io.BytesIO()
        pq.write_table(data, buffer)
        self.stats.bytes_loaded += buffer.tell()
        self.stats.load_jobs += 1
        buffer.seek(0)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET, write_disposition=disposition
        )
        self.bq.load_table_from_file(buffer, destination, job_config=config).result()

    def _table_id(self, table: TableMapping, suffix: str = "") -> str:
        return f"{self.bq.project}.{self.dataset(table)}.{table.target_table}{suffix}"

    def copy_whole(self, peer: PeerTable) -> int:
        data = self._rows(peer)
        self.bq.create_dataset(self.dataset(peer.table), exists_ok=True)
        self._load(data, self._table_id(peer.table), bigquery.WriteDisposition.WRITE_TRUNCATE)
        return int(data.num_rows)

    def copy_increment(self, peer: PeerTable) -> int:
        if peer.cursor is None or peer.last is None:
            return self.copy_whole(peer)  # no cursor column, or the first run: a whole copy
        data = self._rows(peer, f"WHERE {quote_mysql(peer.cursor)} >= %s", (peer.last,))
        if data.num_rows == 0:
            return 0
        stage = self._table_id(peer.table, "__stage")
        self._load(data, stage, bigquery.WriteDisposition.WRITE_TRUNCATE)
        names = data.column_names
        on = " AND ".join(f"t.`{k}` = s.`{k}`" for k in peer.primary_key)
        sets = ", ".join(f"`{n}` = s.`{n}`" for n in names if n not in peer.primary_key)
        merge = (
            f"MERGE {self.ref(peer.table)} AS t USING {self.ref(peer.table, '__stage')} AS s ON {on} "
            f"WHEN MATCHED AND t._src_hash != s._src_hash THEN UPDATE SET {sets} "
            f"WHEN NOT MATCHED THEN INSERT ({', '.join(f'`{n}`' for n in names)}) "
            f"VALUES ({', '.join(f's.`{n}`' for n in names)})"
        )
        self.stats.query_jobs += 1
        self.bq.query(merge).result()
        return int(data.num_rows)

    def run_once(self, incremental: bool) -> dict[str, Any]:
        started = time.time()
        rows = 0
        for peer in self.tables:
            rows += self.copy_increment(peer) if incremental else self.copy_whole(peer)
        record = {"started": started, "ended": time.time(), "rows": rows}
        self.stats.rows_copied += rows
        self.stats.runs.append(record)
        return record

    def summary(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "runs": self.stats.runs,
            "load_jobs": self.stats.load_jobs,
            "query_jobs": self.stats.query_jobs,
            "bytes_loaded": self.stats.bytes_loaded,
            "rows_copied": self.stats.rows_copied,
            "cursor_columns": {
                p.table.target: p.cursor or "(none: whole copy every run)" for p in self.tables
            },
        }


def compare_with_source(prefix: str) -> dict[str, Any]:
    """Per table and in total: rows the copy lacks (missed inserts), rows it holds that the source deleted (missed
    deletes) and rows it holds with other values (missed updates), by primary key and row hash."""
    peer = Peer(prefix)
    totals = {"source_rows": 0, "missing": 0, "missed_deletes": 0, "missed_updates": 0}
    per_table = {}
    for table in peer.tables:
        key_sql = ", ".join(f"CAST({quote_mysql(k)} AS CHAR)" for k in table.primary_key)
        connection = cluster_connection(table.cluster, Settings.load()).connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET SESSION time_zone = '+00:00'")
                cursor.execute(f"SELECT {key_sql}, {table.row_hash()} FROM {table.source}")
                source = {tuple(map(str, row[:-1])): row[-1] for row in cursor.fetchall()}
        finally:
            connection.close()
        try:
            rows = peer.bq.query(
                f"SELECT {', '.join(f'`{k}`' for k in table.primary_key)}, _src_hash FROM {peer.ref(table.table)}"
            ).result()
            copied = {tuple(str(row[k]) for k in table.primary_key): row["_src_hash"] for row in rows}
        except exceptions.NotFound:
            copied = {}
        result = {
            "source_rows": len(source),
            "missing": len(source.keys() - copied.keys()),
            "missed_deletes": len(copied.keys() - source.keys()),
            "missed_updates": sum(1 for k in source.keys() & copied.keys() if source[k] != copied[k]),
        }
        per_table[table.table.target] = result
        for name, value in result.items():
            totals[name] += value
    return {"total": totals, "tables": per_table}


def latencies(prefix: str, since: float) -> list[float]:
    """Seconds from each held row's change (its cursor time) to its load, for rows changed after `since`."""
    peer = Peer(prefix)
    seconds: list[float] = []
    for table in peer.tables:
        if table.cursor not in ("updated_at", "created_at"):
            continue
        try:
            rows = peer.bq.query(
                f"SELECT UNIX_MICROS(_peer_loaded_at) - UNIX_MICROS(_changed_at) AS us FROM {peer.ref(table.table)} "
                f"WHERE _changed_at >= TIMESTAMP_MICROS({int(since * 1e6)})"
            ).result()
        except exceptions.NotFound:
            continue
        seconds += [row.us / 1e6 for row in rows if row.us is not None]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["daily", "incremental"])
    parser.add_argument("--prefix", required=True, help="BigQuery dataset prefix of this copy")
    parser.add_argument("--interval", type=float, default=120.0, help="incremental: seconds between runs")
    parser.add_argument("--until", type=float, default=0.0, help="incremental: stop after this epoch time")
    parser.add_argument(
        "--ready-file",
        help="incremental: make the first (full) copy, write this file, then copy every interval for --duration "
        "seconds; the first copy is set up, not counted",
    )
    parser.add_argument("--duration", type=float, default=0.0, help="incremental: with --ready-file")
    parser.add_argument("--out", required=True, help="JSON summary")
    args = parser.parse_args()
    peer = Peer(args.prefix)
    if args.mode == "daily":
        peer.run_once(incremental=False)
    else:
        until = args.until
        if (
            args.ready_file
        ):  # the initial sync, done before the measurement as a copy in service did it long ago
            peer.run_once(incremental=True)
            peer.stats = CopyStats()
            until = time.time() + args.duration
            with open(args.ready_file, "w", encoding="utf-8") as handle:
                handle.write("ready\n")
            time.sleep(args.interval)
        while True:
            started = time.time()
            peer.run_once(incremental=True)
            if started + args.interval >= until:
                break
            time.sleep(max(0.0, started + args.interval - time.time()))
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(peer.summary(), handle, indent=2, default=str)


if __name__ == "__main__":
    main()
