"""The local BigQuery server's Storage Write API made to behave as BigQuery's, with its native CDC.

Stock bqemulator 1.4.0 drops `_CHANGE_TYPE`/`_CHANGE_SEQUENCE_NUMBER` (an UPSERT is a plain insert), knows no
primary keys or `max_staleness`, breaks Google's Python writer (follow-up AppendRows without `write_stream`), takes
two different locks for REST and gRPC writes on one DuckDB connection, ignores BatchCommit's `parent` and caps a
request at 10 MiB. `apply()` (called by the launcher, `local_stack/bigquery_emulator.py`) replaces the functions
concerned; each behaviour is asserted by `tests/test_bigquery_conformance.py` and proven missing from the stock
server by `tests/test_bigquery_conformance_fails_on_stock.py`. What BigQuery documents, and this server does:

- a table's primary key (`PRIMARY KEY (...) NOT ENFORCED` in DDL, `tableConstraints` in REST) and
  `max_staleness` (DDL OPTIONS, REST `maxStaleness`) are stored and returned;
- default-stream proto rows with `_CHANGE_TYPE` UPSERT/DELETE are applied per primary key: the highest
  `_CHANGE_SEQUENCE_NUMBER` wins (up to 4 `/`-separated hex sections, compared as unsigned numbers), an equal one
  lets the later write win, an older one is ignored, a DELETE is kept to order later writes. The table read
  returns the merged state (as fresh as `max_staleness` 0): as BigQuery merges at query time, an append only keeps
  its rows as the table's pending changes and they are merged before the table is read (`PendingChanges`);
- a table with CDC active refuses UPDATE, DELETE and MERGE;
- one lock orders every write, REST or gRPC; a request may be up to 20 MB; BatchCommit commits only streams of
  its `parent` table;
- a query never waits for the writes, nor they for it: a SELECT runs on a DuckDB cursor of its own in a worker
  thread (stock runs it on the REST event loop under the connection's lock, so one long query stalled every other
  REST call and every append), and sees the last committed state (DuckDB's snapshot isolation).

Held under that one lock, an append is kept short (docs/local-stack.md, "BigQuery"): a CDC append only adds rows to
the table's pending changes, the merge runs its statements on DuckDB directly once for all of them, and a table's row
count (numRows) is written to the catalog in the background (`RowCounts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

MAX_REQUEST_BYTES = 20_000_000  # BigQuery: an AppendRows request may be up to 20 MB
CHANGE_TYPE, CHANGE_SEQUENCE = "_CHANGE_TYPE", "_CHANGE_SEQUENCE_NUMBER"
SCHEMA = "__bqemu_cdc"  # DuckDB schema of the registry and of each CDC table's sequence ledger
WRITE_LOCK = threading.Lock()  # every write, REST (event loop) or gRPC (thread pool)
# Every call into the one DuckDB connection, from any thread: two threads in it at once (a REST read during a gRPC
# write's transaction) deadlock it, and a read must not see a CDC apply half done. Taken after WRITE_LOCK.
ENGINE_LOCK = threading.RLock()
LEDGERS: set[str] = set()  # the sequence ledgers created (a ledger's name carries its table's creation time)


class CdcError(ValueError):
    """A CDC write BigQuery would refuse; the message says why."""


# -- change sequence numbers -------------------------------------------------------------------------------------


def sequence_sort_key(value: str | None) -> str:
    """`_CHANGE_SEQUENCE_NUMBER` as a string that sorts as BigQuery compares them: up to four `/`-separated
    sections of up to 16 hex digits, compared section by section as unsigned numbers ('' = none)."""
    if not value:
        return ""
    sections = value.split("/")
    if len(sections) > 4 or not all(re.fullmatch(r"[0-9A-Fa-f]{1,16}", s) for s in sections):
        raise CdcError(
            f"{CHANGE_SEQUENCE} {value!r}: expected up to 4 '/'-separated sections of 1-16 hexadecimal digits"
        )
    return "/".join(s.upper().rjust(16, "0") for s in sections + ["0"] * (4 - len(sections)))


# -- the registry: primary keys, max_staleness, CDC state -------------------------------------------------------


class Registry:
    """Per table (project, dataset, table): primary key, max_staleness, whether CDC is active - kept in DuckDB so
    it survives a restart with --data-dir. An entry is valid only for the table it was made for (its creation time):
    a table dropped and created again starts without one."""

    def __init__(self) -> None:
        self.ready = False
        # (project, dataset, table) -> (created, entry): this process is the registry's only writer
        self._cache: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] = {}

    def _ensure(self, engine: Any) -> None:
        if not self.ready:
            engine.execute(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"')
            engine.execute(
                f'CREATE TABLE IF NOT EXISTS "{SCHEMA}".tables (project VARCHAR, dataset VARCHAR, "table" VARCHAR, '
                "created VARCHAR, primary_key VARCHAR, max_staleness VARCHAR, cdc_active BOOLEAN)"
            )
            self.ready = True

    def get(self, ctx: Any, project: str, dataset: str, table: str) -> dict[str, Any]:
        meta = ctx.catalog.get_table(project, dataset, table)
        if meta is None:
            return {}
        with ENGINE_LOCK:
            return self._entry(ctx, project, dataset, table, str(meta.creation_time))

    def _entry(self, ctx: Any, project: str, dataset: str, table: str, created: str) -> dict[str, Any]:
        cached = self._cache.get((project, dataset, table))
        if cached is not None and cached[0] == created:
            return dict(cached[1])
        entry = self._read(ctx, project, dataset, table, created)
        self._cache[(project, dataset, table)] = (created, entry)
        return dict(entry)

    def _read(self, ctx: Any, project: str, dataset: str, table: str, created: str) -> dict[str, Any]:
        self._ensure(ctx.engine)
        row = ctx.engine.execute(
            f'SELECT created, primary_key, max_staleness, cdc_active FROM "{SCHEMA}".tables '
            'WHERE project = ? AND dataset = ? AND "table" = ?',
            [project, dataset, table],
        ).fetchone()
        if row is None or row[0] != created:
            return {}
        return {
            "primary_key": json.loads(row[1] or "[]"),
            "max_staleness": row[2],
            "cdc_active": bool(row[3]),
        }

    def update(self, ctx: Any, project: str, dataset: str, table: str, **changes: Any) -> None:
        meta = ctx.catalog.get_table(project, dataset, table)
        if meta is None:
            return
        with ENGINE_LOCK:
            self._update(ctx, project, dataset, table, str(meta.creation_time), changes)

    def _update(
        self, ctx: Any, project: str, dataset: str, table: str, created: str, changes: dict[str, Any]
    ) -> None:
        entry: dict[str, Any] = {"primary_key": [], "max_staleness": None, "cdc_active": False}
        entry.update(self._entry(ctx, project, dataset, table, created))
        entry.update(changes)
        self._ensure(ctx.engine)
        ctx.engine.execute(
            f'DELETE FROM "{SCHEMA}".tables WHERE project = ? AND dataset = ? AND "table" = ?',
            [project, dataset, table],
        )
        ctx.engine.execute(
            f'INSERT INTO "{SCHEMA}".tables VALUES (?, ?, ?, ?, ?, ?, ?)',
            [
                project,
                dataset,
                table,
                created,
                json.dumps(entry["primary_key"]),
                entry["max_staleness"],
                entry["cdc_active"],
            ],
        )
        self._cache[(project, dataset, table)] = (created, entry)


REGISTRY = Registry()


def _own_table(kind: str, project: str, dataset: str, table: str, created: object) -> str:
    """A DuckDB table of ours that belongs to one CDC table (named after it and its creation time: a table created
    again gets new ones)."""
    import hashlib

    name = hashlib.sha1(f"{project}.{dataset}.{table}@{created}".encode()).hexdigest()[:20]
    return f'"{SCHEMA}"."{kind}_{name}"'


def _sequence_table(project: str, dataset: str, table: str, created: object) -> str:
    """The table's ledger of each key's last sequence (and its deletes)."""
    return _own_table("seq", project, dataset, table, created)


# -- applying CDC rows -------------------------------------------------------------------------------------------


def _pending_table(project: str, dataset: str, table: str, created: object) -> str:
    """The table's changes taken but not merged yet."""
    return _own_table("pending", project, dataset, table, created)


def take_changes(ctx: Any, project: str, dataset: str, table: str, rows: Any) -> None:
    """Take UPSERT/DELETE rows (an Arrow table: the target's columns + the two pseudo-columns): checked as BigQuery
    checks them, then kept in the table's pending changes, merged before the table is next read (`PENDING`). The
    caller holds WRITE_LOCK."""
    import pyarrow as pa

    entry = REGISTRY.get(ctx, project, dataset, table)
    key = entry.get("primary_key") or []
    if any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) for k in key):
        raise CdcError(f"{project}.{dataset}.{table}: primary key {key} is not a list of column names")
    if not key:
        raise CdcError(
            f"{project}.{dataset}.{table} has no primary key: _CHANGE_TYPE needs one "
            "(PRIMARY KEY (...) NOT ENFORCED, or tableConstraints.primaryKey)"
        )
    missing = [k for k in key if k not in rows.column_names]
    if missing:
        raise CdcError(f"{project}.{dataset}.{table}: the rows lack primary key column(s) {missing}")
    types = rows.column(CHANGE_TYPE).to_pylist()
    if any(t not in ("UPSERT", "DELETE") for t in types):
        bad = next(t for t in types if t not in ("UPSERT", "DELETE"))
        raise CdcError(f"{bad!r} is not a valid {CHANGE_TYPE}: use UPSERT or DELETE")
    sequences = [sequence_sort_key(s) for s in rows.column(CHANGE_SEQUENCE).to_pylist()]
    meta = ctx.catalog.get_table(project, dataset, table)
    if meta is None:
        return
    data = rows.drop_columns([CHANGE_TYPE, CHANGE_SEQUENCE])
    incoming = data.append_column("__seq", pa.array(sequences, pa.string()))
    incoming = incoming.append_column("__type", pa.array(types, pa.string()))
    incoming = incoming.append_column("__order", pa.array(PENDING.orders(len(types)), pa.int64()))
    PENDING.add(ctx, (project, dataset, table), str(meta.creation_time), incoming)
    if not entry.get("cdc_active"):
        REGISTRY.update(ctx, project, dataset, table, cdc_active=True)
    ctx.snapshots.record_change(project, dataset, table)


def merge_changes(ctx: Any, ids: tuple[str, str, str], pending: str, columns: list[str]) -> None:
    """Merge a table's pending changes per primary key: the highest sequence wins (of equal ones the later write),
    a change older than the last one applied to its key is ignored, a DELETE is kept to order later writes. The
    caller holds WRITE_LOCK and ENGINE_LOCK."""
    from bqemulator.storage.sql_identifiers import quoted_table_ref

    key = REGISTRY.get(ctx, *ids).get("primary_key") or []
    meta = ctx.catalog.get_table(*ids)
    ledger = _sequence_table(*ids, meta.creation_time if meta else None)
    connection = ctx.engine.connection.raw
    quoted = [f'"{k}"' for k in key]
    same = " AND ".join(f"a.{q} = b.{q}" for q in quoted)
    data_columns = ", ".join(f'"{c}"' for c in columns if c not in ("__seq", "__type", "__order"))
    target = quoted_table_ref(*ids)
    connection.execute("BEGIN TRANSACTION")
    try:
        if ledger not in LEDGERS:
            connection.execute(
                f"CREATE TABLE IF NOT EXISTS {ledger} AS SELECT {', '.join(quoted)}, __seq, __type "
                f"FROM {pending} WHERE false"
            )
        connection.execute(
            "CREATE OR REPLACE TEMP TABLE __cdc_winners AS SELECT a.* EXCLUDE (__order) FROM (SELECT * FROM "
            f"{pending} QUALIFY row_number() OVER (PARTITION BY {', '.join(quoted)} ORDER BY __seq DESC, "
            f"__order DESC) = 1) AS a ANTI JOIN {ledger} AS b ON {same} AND b.__seq > a.__seq"
        )
        connection.execute(
            f"DELETE FROM {target} AS b WHERE EXISTS (SELECT 1 FROM __cdc_winners AS a WHERE {same})"
        )
        connection.execute(
            f"INSERT INTO {target} ({data_columns}) SELECT {data_columns} FROM __cdc_winners "
            "WHERE __type = 'UPSERT'"
        )
        connection.execute(
            f"DELETE FROM {ledger} AS b WHERE EXISTS (SELECT 1 FROM __cdc_winners AS a WHERE {same})"
        )
        connection.execute(
            f"INSERT INTO {ledger} SELECT {', '.join(quoted)}, __seq, __type FROM __cdc_winners"
        )
        connection.execute(f"DROP TABLE {pending}")
        connection.execute(f'DELETE FROM "{SCHEMA}".pending WHERE name = ?', [pending])
        count = connection.execute(f"SELECT COUNT(*) FROM {target}").fetchone()[0]
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    LEDGERS.add(ledger)
    if meta is not None:
        ROW_COUNTS.record(ctx, meta, int(count))


class PendingChanges:
    """CDC rows taken but not merged into their tables yet, kept in DuckDB (a table of them per target, and a list
    of those tables: a restarted server merges what it held). An append only adds its rows; the merge - the costly
    part, a join with the table's sequence ledger and two deletes and inserts - runs before anything reads the table
    (a query naming it, tables.get, a schema change: as BigQuery merges at query time, a read sees every change
    taken), when the table has MAX_ROWS pending, and in the background (one table at a time) for changes older than
    MERGE_EVERY_S. Many appends to a table between reads merge in one go instead of one each."""

    MERGE_EVERY_S = 300.0
    MAX_ROWS = 200_000

    def __init__(self) -> None:
        # pending table -> (ctx, table ids, its columns, rows, first taken at (monotonic))
        self._tables: dict[str, tuple[Any, tuple[str, str, str], list[str], int, float]] = {}
        self._loaded: set[int] = set()  # engines whose list of pending tables was read
        self._last_order = 0
        self._thread: threading.Thread | None = None

    def orders(self, count: int) -> list[int]:
        """Increasing numbers for `count` rows, later than any taken before (also across restarts)."""
        first = max(self._last_order + 1, time.time_ns())
        self._last_order = first + count - 1
        return list(range(first, first + count))

    def _load(self, ctx: Any) -> None:
        """The pending tables a restarted server finds (the caller holds ENGINE_LOCK)."""
        if id(ctx.engine) in self._loaded:
            return
        connection = ctx.engine.connection.raw
        REGISTRY._ensure(ctx.engine)
        connection.execute(
            f'CREATE TABLE IF NOT EXISTS "{SCHEMA}".pending (name VARCHAR, project VARCHAR, dataset VARCHAR, '
            '"table" VARCHAR, columns VARCHAR)'
        )
        for name, project, dataset, table, columns in connection.execute(
            f'SELECT name, project, dataset, "table", columns FROM "{SCHEMA}".pending'
        ).fetchall():
            self._tables.setdefault(name, (ctx, (project, dataset, table), json.loads(columns), 1, 0.0))
        self._loaded.add(id(ctx.engine))

    def add(self, ctx: Any, ids: tuple[str, str, str], created: str, incoming: Any) -> None:
        """Keep `incoming` (the target's columns, __seq, __type, __order) as pending changes of table `ids`."""
        with ENGINE_LOCK:
            self._load(ctx)
            pending = _pending_table(*ids, created)
            known = self._tables.get(pending)
            if known is not None and known[2] != incoming.column_names:  # the table's columns changed
                self.merge(pending)
                known = None
            connection = ctx.engine.connection.raw
            connection.register("__cdc_incoming", incoming)
            try:
                if known is None:
                    connection.execute("BEGIN TRANSACTION")
                    connection.execute(f"CREATE TABLE {pending} AS SELECT * FROM __cdc_incoming")
                    connection.execute(
                        f'INSERT INTO "{SCHEMA}".pending VALUES (?, ?, ?, ?, ?)',
                        [pending, *ids, json.dumps(incoming.column_names)],
                    )
                    connection.execute("COMMIT")
                    known = (ctx, ids, incoming.column_names, 0, time.monotonic())
                else:
                    connection.execute(f"INSERT INTO {pending} SELECT * FROM __cdc_incoming")
            finally:
                connection.unregister("__cdc_incoming")
            self._tables[pending] = (*known[:3], known[3] + incoming.num_rows, known[4])
            if known[3] + incoming.num_rows >= self.MAX_ROWS:
                self.merge(pending)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cdc-merge", daemon=True)
            self._thread.start()

    def merge(self, pending: str) -> None:
        """Merge one pending table into its target (the caller holds WRITE_LOCK and ENGINE_LOCK)."""
        known = self._tables.pop(pending, None)
        if known is None:
            return
        ctx, ids, columns, _, _ = known
        meta = ctx.catalog.get_table(*ids)
        if meta is None or _pending_table(*ids, meta.creation_time) != pending:  # the table was dropped
            connection = ctx.engine.connection.raw
            connection.execute(f"DROP TABLE IF EXISTS {pending}")
            connection.execute(f'DELETE FROM "{SCHEMA}".pending WHERE name = ?', [pending])
            return
        try:
            merge_changes(ctx, ids, pending, columns)
        except BaseException:
            self._tables[pending] = known  # merged by the next read or round
            raise
        ctx.snapshots.record_change(*ids)

    def before_reading(self, ctx: Any, ids: tuple[str, str, str] | None = None, sql: str = "") -> None:
        """Merge the pending changes of table `ids`, or of every table `sql` names, before they are read."""
        with ENGINE_LOCK:
            self._load(ctx)
            wanted = [
                name
                for name, (_, table_ids, _, _, _) in self._tables.items()
                if table_ids == ids
                or (sql and re.search(rf"(?<![\w-]){re.escape(table_ids[2])}(?![\w-])", sql, re.IGNORECASE))
            ]
        if not wanted:
            return
        with WRITE_LOCK, ENGINE_LOCK:
            for name in wanted:
                self.merge(name)

    def merge_oldest(self) -> bool:
        """Merge the table whose changes have waited longest, if MERGE_EVERY_S or more; whether one was due."""
        now = time.monotonic()
        waited = {name: now - known[4] for name, known in list(self._tables.items())}
        oldest = max(waited, key=lambda name: waited[name], default=None)
        if oldest is None or waited[oldest] < self.MERGE_EVERY_S:
            return False
        with WRITE_LOCK, ENGINE_LOCK:
            self.merge(oldest)
        return True

    def _run(self) -> None:
        """One table at a time, a pause between two: the appends get the write lock in between."""
        while True:
            try:
                due = self.merge_oldest()
            except Exception as exc:  # the engine stopped; a restarted server finds them in DuckDB
                print(f"bigquery_cdc: pending changes not merged: {exc!r}", file=sys.stderr)
                due = False
            time.sleep(0.2 if due else 1.0)


PENDING = PendingChanges()


class RowCounts:
    """Tables' row counts after Write API writes: in the catalog's memory at once (tables.get shows them), written
    to its DuckDB table by a background thread every FLUSH_SECONDS in one transaction, and when the engine stops
    (a server killed loses at most that much of them). Writing the whole table entry in every append cost as much as
    the append itself; BigQuery's numRows is not immediate either (it leaves out the streaming buffer). A catalog
    without the memory cache is written through."""

    FLUSH_SECONDS = 10.0

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str, str], Any] = {}  # table -> the context (catalog, engine) it is in
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def record(self, ctx: Any, meta: Any, num_rows: int) -> None:
        """`num_rows` for the table of catalog entry `meta`."""
        ids = (meta.project_id, meta.dataset_id, meta.table_id)
        updated = meta.model_copy(update={"num_rows": num_rows})
        cache = getattr(ctx.catalog, "_cache", None)
        if cache is None or not hasattr(ctx.catalog, "_write_table"):
            ctx.catalog.update_table(updated)
            return
        cache.update_table(updated)
        with self._lock:
            self._pending[ids] = ctx
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="row-counts", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        """Write each pending table's entry as the catalog's memory holds it (a table dropped meanwhile: none)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        with WRITE_LOCK, ENGINE_LOCK:  # one transaction: the lock is held for one commit, not one per table
            engines = {id(ctx.engine): ctx.engine for ctx in pending.values()}
            for engine in engines.values():
                engine.execute("BEGIN TRANSACTION")
            try:
                by_engine: dict[int, list[Any]] = defaultdict(list)
                for ids, ctx in pending.items():
                    meta = ctx.catalog._cache.get_table(*ids)
                    if meta is not None:
                        by_engine[id(ctx.engine)].append(meta)
                for key, metas in by_engine.items():
                    _write_table_entries(engines[key], metas)
            except BaseException:
                for engine in engines.values():
                    engine.execute("ROLLBACK")
                with self._lock:  # written by the next flush
                    self._pending = {**pending, **self._pending}
                raise
            for engine in engines.values():
                engine.execute("COMMIT")

    def _run(self) -> None:
        while True:
            time.sleep(self.FLUSH_SECONDS)
            try:
                self.flush()
            except Exception as exc:  # the engine stopped: what is left is written by the stop hook, if any
                print(f"bigquery_cdc: row counts not written: {exc!r}", file=sys.stderr)


ROW_COUNTS = RowCounts()

# the catalog's row of a table, as bqemulator's DuckDBCatalogRepository._write_table writes it
_TABLE_ENTRY_COLUMNS = (
    "project_id, dataset_id, table_id, table_type, metadata_json, creation_time, last_modified_time, num_rows, "
    "num_bytes, etag"
)
_TABLE_ENTRIES_PER_STATEMENT = 200


def _write_table_entries(engine: Any, metas: list[Any]) -> None:
    """Write catalog entries as `_write_table` does, a few hundred per statement: one INSERT OR REPLACE per table
    held the engine for ~1.5 s per flush of 70 tables' three tables - 15 % of the server's CPU in a 1x bench, and
    every append waited behind it. Call with ENGINE_LOCK held."""
    from bqemulator.catalog.duckdb_repository import CATALOG_SCHEMA

    for start in range(0, len(metas), _TABLE_ENTRIES_PER_STATEMENT):
        chunk = metas[start : start + _TABLE_ENTRIES_PER_STATEMENT]
        parameters = [
            value
            for t in chunk
            for value in (
                t.project_id,
                t.dataset_id,
                t.table_id,
                t.table_type,
                t.model_dump_json(by_alias=True),
                t.creation_time,
                t.last_modified_time,
                t.num_rows,
                t.num_bytes,
                t.etag,
            )
        ]
        rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
        engine.execute(
            f'INSERT OR REPLACE INTO "{CATALOG_SCHEMA}"."tables" ({_TABLE_ENTRY_COLUMNS}) VALUES {rows}',
            parameters,
        )


def _writing_row_counts_first(stop: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """DuckDBEngine.stop: the pending row counts written before the connection closes."""

    @functools.wraps(stop)
    async def stop_engine(self: Any) -> None:
        if self._connection is not None:
            ROW_COUNTS.flush()
        await stop(self)

    return stop_engine


# -- the Storage Write API service -------------------------------------------------------------------------------


def _rows_with_change_columns(original: Callable[..., Any]) -> Callable[..., Any]:
    """Decode proto rows keeping `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER` (stock drops every field the table
    does not have), appended after the table's columns."""

    @functools.wraps(original)
    def rows_for_request(
        request: Any, proto_decoder: Any, arrow_schema_bytes: Any, target_schema: Any
    ) -> Any:
        from bqemulator.grpc_api.write_servicer import _has_field
        from bqemulator.streaming.proto_deserializer import ProtoRowDecoder

        if not _has_field(request, "proto_rows"):
            return original(request, proto_decoder, arrow_schema_bytes, target_schema)
        proto_data = request.proto_rows
        if _has_field(proto_data, "writer_schema"):
            proto_decoder = ProtoRowDecoder(proto_data.writer_schema.proto_descriptor)
        if proto_decoder is None or CHANGE_TYPE not in proto_decoder.field_names:
            return original(request, proto_decoder, arrow_schema_bytes, target_schema)
        table = _decoded_columns(proto_decoder, proto_data.rows.serialized_rows, target_schema)
        return table, proto_decoder, arrow_schema_bytes

    return rows_for_request


def _decoded_columns(proto_decoder: Any, serialized_rows: Any, target_schema: Any) -> Any:
    """The rows as an Arrow table of the target's columns and the two change columns: each row parsed once by the
    protobuf runtime, each column read off the parsed rows (stock builds a dict per row, walking the descriptor for
    every field of every row, then coerces every value by its Arrow type). A value already of the Python type its
    Arrow type takes goes to Arrow as it is (what stock's coercion returns for it); any other is coerced as stock
    does. A writer schema with repeated or nested fields is decoded by stock's row decoder."""
    import pyarrow as pa
    from bqemulator.storage.arrow_bridge import _coerce_to_arrow_value

    descriptor = proto_decoder._descriptor
    if any(f.is_repeated or f.message_type is not None for f in descriptor.fields):
        decoded = [proto_decoder.decode(raw) for raw in serialized_rows]
        columns = {name: [d.get(name) for d in decoded] for name in proto_decoder.field_names}
    else:
        parse = proto_decoder._message_class.FromString
        messages = [parse(raw) for raw in serialized_rows]
        columns = {
            name: [getattr(m, name) if m.HasField(name) else None for m in messages]
            for name in proto_decoder.field_names
        }
    none = [None] * len(serialized_rows)
    arrays = {}
    for f in target_schema:
        values = columns.get(f.name, none)
        kind = _python_type(f.type)
        if kind is None or not all(v is None or type(v) is kind for v in values):
            values = [_coerce_to_arrow_value(v, f.type) for v in values]
        arrays[f.name] = pa.array(values, type=f.type)
    table = pa.table(arrays, schema=target_schema)
    for name in (CHANGE_TYPE, CHANGE_SEQUENCE):
        table = table.append_column(name, pa.array(columns.get(name, none), pa.string()))
    return table


def _python_type(arrow_type: Any) -> type | None:
    """The Python type of values stock's coercion passes to Arrow unchanged for `arrow_type` (None: it changes
    them, e.g. text to Decimal)."""
    import pyarrow as pa

    t = pa.types
    if t.is_integer(arrow_type) or t.is_timestamp(arrow_type) or t.is_date(arrow_type):
        return int  # integers as they are; epoch microseconds and days are not text, so stock passes them on
    if t.is_floating(arrow_type):
        return float
    if t.is_boolean(arrow_type):
        return bool
    if t.is_string(arrow_type) or t.is_large_string(arrow_type):
        return str
    if t.is_binary(arrow_type) or t.is_large_binary(arrow_type):
        return bytes
    return None


def _flush_to_target(self: Any, stream: Any, rows: Any) -> None:
    """Write committed rows: CDC rows applied per key, others appended; always under the one write lock."""
    from bqemulator.storage.sql_identifiers import quoted_table_ref, register_name

    ctx = self._ctx
    ids = (stream.project_id, stream.dataset_id, stream.table_id)
    with WRITE_LOCK, ENGINE_LOCK:
        if CHANGE_TYPE in rows.column_names:
            take_changes(ctx, *ids, rows)
            return
        name = register_name(f"__bqemu_write_{id(rows):x}")
        ctx.engine.connection.register(name, rows)
        try:
            ctx.engine.execute(f"INSERT INTO {quoted_table_ref(*ids)} SELECT * FROM {name}")
        finally:
            ctx.engine.connection.unregister(name)
        meta = ctx.catalog.get_table(*ids)
        if meta is not None:
            ROW_COUNTS.record(ctx, meta, meta.num_rows + rows.num_rows)
        ctx.snapshots.record_change(*ids)


def _perform_append(original: Callable[..., bytes]) -> Callable[..., bytes]:
    """A CDC write BigQuery refuses is answered with the error, on the open connection."""

    @functools.wraps(original)
    def perform_append(self: Any, bound_stream: Any, rows: Any, offset: Any, max_buffered_rows: int) -> bytes:
        from bqemulator.grpc_api.write_servicer import _error_response

        try:
            return original(self, bound_stream, rows, offset, max_buffered_rows)
        except CdcError as exc:
            return _error_response(bound_stream.name, str(exc))

    return perform_append


def _ensure_stream_bound(original: Callable[..., Any]) -> Callable[..., Any]:
    """Follow-up AppendRows requests may omit `write_stream` (Google's writer sends it only first)."""

    @functools.wraps(original)
    def ensure_stream_bound(self: Any, stream_name: str, bound_ctx: Any, context: Any) -> Any:
        if not stream_name and bound_ctx is not None:
            return bound_ctx
        return original(self, stream_name, bound_ctx, context)

    return ensure_stream_bound


def _batch_commit_checks_parent(original: Callable[..., bytes]) -> Callable[..., bytes]:
    """BatchCommitWriteStreams commits streams of its `parent` table only."""

    @functools.wraps(original)
    def batch_commit(self: Any, request_bytes: bytes, context: Any) -> bytes:
        import grpc
        from google.cloud.bigquery_storage_v1 import types

        request = types.BatchCommitWriteStreamsRequest.deserialize(request_bytes)
        parent = request.parent.rstrip("/")
        for name in request.write_streams:
            if not name.startswith(parent + "/streams/"):
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(f"Stream {name} does not belong to the parent table {parent}")
                return b""
        return original(self, request_bytes, context)

    return batch_commit


@contextlib.asynccontextmanager
async def _write_lock(self: Any) -> AsyncIterator[None]:
    """The REST side of the one write lock (waited for off the event loop)."""
    await asyncio.get_running_loop().run_in_executor(None, WRITE_LOCK.acquire)
    try:
        yield
    finally:
        WRITE_LOCK.release()


def _locked_connection(self: Any) -> Any:
    """DuckDBEngine.connection: the connection with each call under ENGINE_LOCK."""
    from bqemulator.domain.errors import InternalError

    if self._connection is None:
        raise InternalError("DuckDBEngine not started")
    return _LockedConnection(self._connection)


class _Locked:
    """An object of the DuckDB connection (the connection, a result relation) whose every call holds ENGINE_LOCK."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if not callable(attribute):
            return attribute

        def locked(*args: Any, **kwargs: Any) -> Any:
            with ENGINE_LOCK:
                result = attribute(*args, **kwargs)
            return self if result is self._target else result

        return locked


class _LockedConnection(_Locked):
    """The DuckDB connection, each call under ENGINE_LOCK. `execute` returns the statement's result taken off the
    connection in the same hold (`_detached_result`): DuckDB keeps one pending result per connection, so fetching it
    in a second hold let another thread's statement replace it (a load job's `fetchone()` then got None)."""

    def execute(self, sql: str, parameters: Any = None) -> Any:
        with ENGINE_LOCK:
            return _detached_result(self._target, sql, parameters)

    @property
    def raw(self) -> Any:
        """The DuckDB connection itself, for a caller that holds ENGINE_LOCK."""
        return self._target


def _detached_result(connection: Any, sql: str, parameters: Any) -> Any:
    """Run `sql` and return its result as an object of its own (call with ENGINE_LOCK held). A query becomes a
    materialised DuckDB relation, so rows and Arrow come out exactly as `connection.execute(...)` gives them; any
    other statement (DML, DDL, SET, ...) runs as before and its small status table is kept as Arrow."""
    import duckdb

    statements = connection.extract_statements(sql)
    if statements and statements[-1].type == duckdb.StatementType.SELECT:
        relation = connection.sql(sql, params=parameters)
        if relation is not None:
            return _Locked(relation.execute())  # fetching a relation runs a scan on the connection
    connection.execute(sql, parameters) if parameters is not None else connection.execute(sql)
    description = connection.description
    table = connection.to_arrow_table() if description else None
    return _StatusResult(description, table)


class _StatusResult:
    """The result of a statement that is not a query, held apart from the connection: DuckDB's status table
    (`Count` or `Success`), or nothing."""

    def __init__(self, description: Any, table: Any) -> None:
        self.description = description
        self._table = table
        self._rows = [tuple(row.values()) for row in table.to_pylist()] if table is not None else []
        self._next = 0

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        rows = self._rows[self._next : self._next + size]
        self._next += len(rows)
        return rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.fetchmany(len(self._rows))

    def to_arrow_table(self) -> Any:
        import pyarrow as pa

        return self._table if self._table is not None else pa.table({})

    fetch_arrow_table = arrow = to_arrow_table


# -- tables: primary keys and max_staleness in REST ---------------------------------------------------------------


def _table_to_rest(original: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    @functools.wraps(original)
    def table_to_rest(meta: Any) -> dict[str, Any]:
        body = original(meta)
        entry = _REST_CONTEXT.registry_entry(meta.project_id, meta.dataset_id, meta.table_id)
        if entry.get("primary_key"):
            body["tableConstraints"] = {"primaryKey": {"columns": entry["primary_key"]}}
        if entry.get("max_staleness"):
            body["maxStaleness"] = entry["max_staleness"]
        return body

    return table_to_rest


class _RestContext:
    """The app context, captured from the first request (the REST renderers get only the table's metadata)."""

    ctx: Any = None

    def registry_entry(self, project: str, dataset: str, table: str) -> dict[str, Any]:
        return REGISTRY.get(self.ctx, project, dataset, table) if self.ctx is not None else {}


_REST_CONTEXT = _RestContext()


def _recording_constraints(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap tables.insert/patch/update: the body's `tableConstraints.primaryKey` and `maxStaleness` are stored."""

    @functools.wraps(handler)
    async def wrapper(**kwargs: Any) -> Any:
        ctx = kwargs["ctx"]
        _REST_CONTEXT.ctx = ctx
        if (
            "table_id" in kwargs
        ):  # a schema change: the pending changes merge with the columns they were taken with
            ids = (kwargs["project_id"], kwargs["dataset_id"], kwargs["table_id"])
            await asyncio.get_running_loop().run_in_executor(None, PENDING.before_reading, ctx, ids)
        body = await kwargs["request"].json()
        result = await handler(**kwargs)
        changes: dict[str, Any] = {}
        if "tableConstraints" in body:
            changes["primary_key"] = list(
                ((body.get("tableConstraints") or {}).get("primaryKey") or {}).get("columns") or []
            )
        if "maxStaleness" in body:
            changes["max_staleness"] = body.get("maxStaleness") or None
        if changes:
            table_id = result["tableReference"]["tableId"]
            async with ctx.engine.write_lock():
                REGISTRY.update(ctx, kwargs["project_id"], kwargs["dataset_id"], table_id, **changes)
            result = {
                **result,
                **_constraints_json(REGISTRY.get(ctx, kwargs["project_id"], kwargs["dataset_id"], table_id)),
            }
        return result

    return wrapper


def _with_context(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    def wrapper(**kwargs: Any) -> Any:
        _REST_CONTEXT.ctx = kwargs["ctx"]
        if "table_id" in kwargs:  # numRows counts every change taken
            PENDING.before_reading(
                kwargs["ctx"], (kwargs["project_id"], kwargs["dataset_id"], kwargs["table_id"])
            )
        return handler(**kwargs)

    return wrapper


def _constraints_json(entry: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if entry.get("primary_key"):
        body["tableConstraints"] = {"primaryKey": {"columns": entry["primary_key"]}}
    if entry.get("max_staleness"):
        body["maxStaleness"] = entry["max_staleness"]
    return body


# -- SQL: primary keys and max_staleness in DDL, no DML on CDC tables --------------------------------------------

_PART = r"(?:`[^`]+`|[A-Za-z0-9_\-]+)"
_NAME = rf"(?P<name>{_PART}(?:\.{_PART})*)"
_CREATE = re.compile(rf"CREATE\s+(OR\s+REPLACE\s+)?TABLE\s+(IF\s+NOT\s+EXISTS\s+)?{_NAME}\s*\(", re.I)
_ALTER = re.compile(rf"ALTER\s+TABLE\s+(IF\s+EXISTS\s+)?{_NAME}\s+", re.I)
_PRIMARY_KEY = re.compile(r",?\s*PRIMARY\s+KEY\s*\((?P<columns>[^)]*)\)\s*NOT\s+ENFORCED", re.I)
_ADD_PRIMARY_KEY = re.compile(r"ADD\s+PRIMARY\s+KEY\s*\((?P<columns>[^)]*)\)\s*NOT\s+ENFORCED", re.I)
_STALENESS = re.compile(
    r"max_staleness\s*=\s*INTERVAL\s+(?P<value>'[^']*'|[0-9]+)\s+(?P<unit>[A-Z]+(\s+TO\s+[A-Z]+)?)", re.I
)
_DML = re.compile(rf"^\s*(UPDATE\s+|DELETE\s+(FROM\s+)?|MERGE\s+(INTO\s+)?){_NAME}(\s|$)", re.I)


def interval_text(value: str, unit: str) -> str:
    """BigQuery's canonical INTERVAL text ('Y-M D H:M:S') of `INTERVAL value unit` (the units max_staleness
    takes)."""
    value = value.strip("'")
    unit = re.sub(r"\s+", " ", unit.upper())
    seconds: float
    if unit == "HOUR TO SECOND":
        parts = [*value.split(":"), "0", "0"][:3]
        seconds = int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2])
    elif unit in ("SECOND", "MINUTE", "HOUR", "DAY"):
        seconds = float(value) * {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400}[unit]
    else:
        return f"{value} {unit}"
    days, rest = divmod(int(seconds), 86400)
    return f"0-0 {days} {rest // 3600}:{rest % 3600 // 60}:{rest % 60}"


def _table_of(name: str, project: str, default_dataset: str | None) -> tuple[str, str, str] | None:
    parts = [p for part in re.findall(r"`[^`]+`|[^.`]+", name) for p in part.strip("`").split(".")]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return project, parts[0], parts[1]
    return (project, default_dataset, parts[0]) if default_dataset else None


def _statements(sql: str) -> list[str]:
    return [s for s in (part.strip() for part in sql.split(";")) if s]


def _execute_query_job(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Primary keys and max_staleness taken out of DDL (DuckDB has no NOT ENFORCED) and stored; UPDATE, DELETE and
    MERGE refused on a table with CDC active."""

    @functools.wraps(original)
    async def execute_query_job(
        project_id: str, job_id: str, bq_sql: str, query_params: Any = None, ctx: Any = None, **kw: Any
    ) -> Any:
        from bqemulator.domain.errors import InvalidQueryError

        _REST_CONTEXT.ctx = ctx
        # the tables it names see every change taken (BigQuery merges CDC changes at query time)
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(PENDING.before_reading, ctx, sql=bq_sql)
        )
        dataset = None  # scripts name their tables in full (dataset.table)
        for statement in _statements(bq_sql):
            match = _DML.match(statement)
            table = _table_of(match["name"], project_id, dataset) if match else None
            if table and REGISTRY.get(ctx, *table).get("cdc_active"):
                raise InvalidQueryError(
                    f"{'.'.join(table)} has change data capture active (UPSERT/DELETE through the Storage Write "
                    "API): it cannot be modified by UPDATE, DELETE or MERGE statements"
                )
        pending: list[tuple[tuple[str, str, str], dict[str, Any]]] = []
        rewritten = []
        for statement in _statements(bq_sql):
            head = _CREATE.match(statement) or _ALTER.match(statement)
            table = _table_of(head["name"], project_id, dataset) if head else None
            changes: dict[str, Any] = {}
            primary_key = _PRIMARY_KEY.search(statement) or _ADD_PRIMARY_KEY.search(statement)
            if table and primary_key:
                changes["primary_key"] = [c.strip().strip("`") for c in primary_key["columns"].split(",")]
                if _ADD_PRIMARY_KEY.search(statement):
                    statement = ""  # the whole ALTER is the constraint
                else:
                    statement = statement[: primary_key.start()] + statement[primary_key.end() :]
            staleness = _STALENESS.search(statement)
            if table and staleness:
                changes["max_staleness"] = interval_text(staleness["value"], staleness["unit"])
            if changes and table and head and head.re is _ALTER and ctx.catalog.get_table(*table) is None:
                raise InvalidQueryError(f"Not found: Table {'.'.join(table)}")
            if changes and table:
                pending.append((table, changes))
            if statement:
                rewritten.append(statement)
        sql = ";\n".join(rewritten) if pending else bq_sql
        result = await original(project_id, job_id, sql, query_params, ctx, **kw) if sql else None
        if pending and getattr(result, "error_result", None) is None:
            async with ctx.engine.write_lock():
                for table, changes in pending:
                    REGISTRY.update(ctx, *table, **changes)
        return result

    return execute_query_job


# -- queries beside the writes ---------------------------------------------------------------------------------

_READERS = threading.local()  # per worker thread: (the engine's connection, this thread's cursor on it)


def _reader(engine: Any) -> Any:
    """This thread's own DuckDB cursor on the engine's database (a connection of its own: it sees every committed
    table and the connection's functions, and runs beside the writes; re-made if the engine was restarted)."""
    connection = engine._connection
    held = getattr(_READERS, "held", None)
    if held is None or held[0] is not connection:
        with ENGINE_LOCK:
            cursor = connection.cursor()
        cursor.execute("SET TimeZone = 'UTC'")  # as the engine's own session (BigQuery TIMESTAMPs are UTC)
        held = _READERS.held = (connection, cursor)
    return held[1]


def _is_query(engine: Any, sql: str) -> bool:
    """Whether `sql` is one SELECT (parsed by DuckDB, not run)."""
    import duckdb

    statements = _reader(engine).extract_statements(sql)
    return len(statements) == 1 and statements[0].type == duckdb.StatementType.SELECT


def _query_arrow(engine: Any, sql: str, parameters: Any) -> Any:
    """What `DuckDBEngine.fetch_arrow` returns for a SELECT, run on this thread's cursor outside ENGINE_LOCK."""
    from bqemulator.storage.engine import _annotate_with_duckdb_types

    cursor = _reader(engine)
    result = cursor.execute(sql, parameters) if parameters is not None else cursor.execute(sql)
    return _annotate_with_duckdb_types(result.to_arrow_table(), result.description)


async def _run_single_sql(project_id: str, bq_sql: str, query_params: Any, ctx: Any, *, caller: Any) -> Any:
    """bqemulator's `executor._run_single_sql` (same translation and error mapping), a SELECT run by `_query_arrow`
    in a worker thread instead of on the event loop."""
    from bqemulator.domain.errors import DomainError
    from bqemulator.jobs.error_mapper import translate_runtime_error
    from bqemulator.jobs.executor import _translator
    from bqemulator.sql.inner_query import rewrite_and_translate_statement
    from bqemulator.sql.parameters import bind_parameters
    from bqemulator.sql.table_rewriter import rewrite_table_refs

    translated_sql = await rewrite_and_translate_statement(
        bq_sql, project_id=project_id, ctx=ctx, caller=caller, translator=_translator
    )
    duckdb_sql = translated_sql
    try:
        duckdb_sql = rewrite_table_refs(translated_sql, project_id)
        duckdb_sql, param_values = bind_parameters(duckdb_sql, query_params)
        if not _is_query(ctx.engine, duckdb_sql):  # DML, DDL: on the event loop, under the locks
            return ctx.engine.fetch_arrow(duckdb_sql, param_values or None)
        return await asyncio.to_thread(_query_arrow, ctx.engine, duckdb_sql, param_values or None)
    except DomainError as exc:
        translated = translate_runtime_error(exc, duckdb_sql=duckdb_sql)
        if translated is exc:
            raise
        raise translated from exc
    except Exception as exc:
        raise translate_runtime_error(exc, duckdb_sql=duckdb_sql) from exc


# -- installing ------------------------------------------------------------------------------------------------


def apply() -> None:
    from bqemulator.api.routes import jobs, tables
    from bqemulator.grpc_api import write_servicer
    from bqemulator.jobs import executor
    from bqemulator.storage.engine import DuckDBEngine

    DuckDBEngine.write_lock = _write_lock  # type: ignore[method-assign,assignment]
    DuckDBEngine.connection = property(_locked_connection)  # type: ignore[method-assign,assignment]
    DuckDBEngine.stop = _writing_row_counts_first(DuckDBEngine.stop)  # type: ignore[method-assign,assignment]
    handler = write_servicer.BigQueryWriteHandler
    handler._flush_to_target = _flush_to_target  # type: ignore[method-assign]
    handler._perform_append = _perform_append(handler._perform_append)  # type: ignore[method-assign]
    handler._ensure_stream_bound = _ensure_stream_bound(handler._ensure_stream_bound)  # type: ignore[method-assign]
    handler._handle_batch_commit_write_streams = _batch_commit_checks_parent(  # type: ignore[method-assign]
        handler._handle_batch_commit_write_streams
    )
    write_servicer._rows_for_request = _rows_with_change_columns(write_servicer._rows_for_request)
    tables._table_to_rest = _table_to_rest(tables._table_to_rest)
    for route in tables.router.routes:
        methods = set(getattr(route, "methods", ()))
        path = str(getattr(route, "path", ""))
        writes = ("POST" in methods and path.endswith("/tables")) or (
            methods & {"PATCH", "PUT"} and path.endswith("/tables/{table_id}")
        )
        if writes:
            route.endpoint = _recording_constraints(route.endpoint)  # type: ignore[attr-defined]
        elif "GET" in methods and (path.endswith("/tables") or path.endswith("/tables/{table_id}")):
            route.endpoint = _with_context(route.endpoint)  # type: ignore[attr-defined]
    executor._run_single_sql = _run_single_sql  # type: ignore[assignment]
    wrapped = _execute_query_job(executor.execute_query_job)
    executor.execute_query_job = wrapped  # type: ignore[assignment]
    jobs.execute_query_job = wrapped  # type: ignore[assignment]
