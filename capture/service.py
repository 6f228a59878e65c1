"""The capture of one cluster: a consistent full load, then the binlog, into DMS-layout Parquet in S3.

Owns the stream loop, the per-table buffers and flushes, the checkpoint and the status document; the full load
is `capture.full_load`, column normalisation `capture.columns`. Guarantees (docs/design.md, "Capture"): streaming
starts at the full load's exact binlog position; flushes happen at transaction boundaries and the checkpoint is
written only after that flush's files are in S3, so a crash replays changes with identical sequences; schema
changes are followed from the binlog's own column list; an unreachable source or S3 is waited out from the
checkpoint, and only a purged binlog (`CaptureError`) stops it, with its status and an alert naming the remedy.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pymysql
from botocore.exceptions import BotoCoreError, ClientError
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import HeartbeatLogEvent, MariadbGtidEvent, QueryEvent, RotateEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

# the reader's decoding corrected (TIME2, invalid dates) and each table definition's table map parsed once
from capture import binlog_fixes, table_map_cache  # noqa: F401
from capture.charsets import learn_single_byte_tables
from capture.columns import UnsupportedColumn, table_map_signature
from capture.ddl import emptied_tables, refilled_tables
from capture.full_load import full_load
from capture.sink import S3Store, TableBuffer, parquet_bytes
from capture.source_tables import CaptureError, SourceTable, columns_of_event, read_columns
from cdc.landing import TRUNCATE_OP, commit_timestamp_text, request_resnapshot
from cdc.mappings import ClusterMapping, TableMapping, load_mappings
from cdc.sequence import BinlogPosition
from cdc.source import MySQLConnection

log = logging.getLogger("cdc.capture")
UPLOAD_THREADS = 8  # concurrent S3 PUTs of one flush

__all__ = ["TRANSIENT_ERRORS", "CaptureError", "CaptureSettings", "ClusterCapture"]


@dataclass(frozen=True)
class CaptureSettings:
    # as DMS's CdcMaxBatchInterval rendered by `cdc dms render`: each file costs a PUT, an S3 event, an SQS message
    # and a read downstream, so shorter flushes trade throughput for seconds (docs/design.md, "Capture")
    flush_interval_s: float = 5.0
    flush_rows: int = 50_000  # per flush, over all tables
    # per flush, over all tables, counted as the binlog bytes of the buffered rows (wide rows reach it before
    # flush_rows; held in Python they take a few times as much): the capture's memory stays bounded
    flush_bytes: int = 16 * 1024 * 1024
    date_folders: bool = True  # DMS DatePartitionEnabled
    load_file_rows: int = 100_000  # rows per LOAD file
    heartbeat_s: float = 1.0
    status_interval_s: float = 2.0
    mapping_check_interval_s: float = 5.0


# A source or S3 that cannot be reached for now: waited out, then the stream resumes from the checkpoint.
TRANSIENT_ERRORS = (
    pymysql.err.OperationalError,
    pymysql.err.InterfaceError,
    OSError,
    BotoCoreError,
    ClientError,
)
MAX_RETRY_DELAY_S = 30.0
BINLOG_PURGED = 1236  # the server no longer has the binlog at the requested position
TableKey = tuple[str, str]  # (schema, table) at the source


@dataclass
class CaptureStats:
    started_at: float = field(default_factory=time.time)
    rows: Counter[str] = field(default_factory=Counter)
    zero_dates: int = 0
    files: int = 0
    lag_s: float = 0.0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (time, rows) per flush

    def rows_per_second(self) -> float:
        now = time.monotonic()
        self.recent = [(t, n) for t, n in self.recent if now - t <= 10]
        if not self.recent:
            return 0.0
        return sum(n for _, n in self.recent) / max(now - self.recent[0][0], 1.0)


@dataclass
class StreamCursor:
    """Where the stream is: the binlog file, the GTID per replication domain, the open transaction."""

    file: str
    gtid_state: dict[str, str]
    tx_gtid: str | None = None
    in_transaction: bool = False


class ClusterCapture:
    def __init__(
        self,
        cluster: ClusterMapping,
        connection: MySQLConnection,
        store: S3Store,
        settings: CaptureSettings | None = None,
        mappings_dir: Path | None = None,
        stop_requested: threading.Event | None = None,
    ):
        self.cluster = cluster
        self.connection = connection
        self.store = store
        self.settings = settings or CaptureSettings()
        self.mappings_dir = mappings_dir
        self.stop_requested = stop_requested or threading.Event()  # shared by the clusters of one process
        self.stats = CaptureStats()
        self.state = "starting"
        self.tables: dict[TableKey, SourceTable] = {}
        self.buffers: dict[TableKey, TableBuffer] = {}
        # a flush's files go to S3 at once (not one after another) and off the decoding thread, which reads on
        # while they upload; the checkpoint follows only when every one of them is there. One flush at a time is
        # in flight, so a table's files land in order and memory holds at most two flushes.
        self._uploads = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="s3-upload")
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush")
        self._flush_in_flight: Future[None] | None = None
        self.checkpoint: dict[str, Any] = {}
        self.errors: list[str] = []
        self._passing_errors: set[str] = set()  # errors that clear once the capture writes to S3 again
        self._buffered_rows = 0
        self._buffered_bytes = 0  # binlog bytes of the buffered rows
        self._pending_bytes = 0  # binlog bytes of the open transaction's rows
        # rows of the open transaction, not yet given a commit time: (table key, op, values, sequence)
        self._pending: list[tuple[TableKey, str, list[Any], str]] = []
        self._completed: dict[str, Any] | None = None  # position of the last complete transaction seen
        # MariaDB writes a transaction's GTID event at commit, with the commit time (row events carry statement times)
        self._tx_timestamp: float | None = None
        self._last_flush = time.monotonic()
        self._last_status = 0.0
        self._last_mapping_check = time.monotonic()
        self._server_id = 100_000 + zlib.crc32(cluster.cluster.encode()) % 1_000_000

    # -- the run loop ------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Full load if needed, then stream until stop() or SIGTERM; wait out an unreachable source or S3. A stopped
        capture says so in its status, also when the way out failed (closing the stream, the last flush: their rows
        are read again from the checkpoint at the next start)."""
        try:
            self._run()
        except Exception as exc:
            if not self.stop_requested.is_set() or self.state == "failed":
                raise
            self._record_error(f"cluster {self.cluster.cluster}: while stopping: {type(exc).__name__}: {exc}")
        if self.state != "failed":
            self._write_stopped()

    def _run(self) -> None:
        failures = 0
        last_failure = 0.0
        loaded = False
        while not self.stop_requested.is_set():
            try:
                if not loaded:  # S3 down at start must not look like "no checkpoint" (a new full load)
                    self.checkpoint = self.store.read_json("checkpoints", self.cluster.cluster) or {}
                    loaded = True
                self._catch_up_snapshots()
                restart = self._stream()
            except CaptureError as exc:
                self._settle_flush()
                self.state = "failed"
                self._record_error(str(exc))
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    self._write_status(force=True)
                raise
            except TRANSIENT_ERRORS as exc:
                failures = 1 if time.monotonic() - last_failure > 2 * MAX_RETRY_DELAY_S else failures + 1
                last_failure = time.monotonic()
                delay = min(MAX_RETRY_DELAY_S, 2.0 ** (failures - 1))
                self._interrupted(exc, delay)
                self.stop_requested.wait(delay)
                continue
            if not restart:
                break

    def _write_stopped(self, attempts: int = 3) -> None:
        """The status `stopped`, the last thing this capture writes: an S3 error is retried (`cdc capture status`
        would show the capture streaming for good otherwise), and a flush still in flight ends first (its status
        would land after this one)."""
        self._settle_flush()
        self.state = "stopped"
        for attempt in range(1, attempts + 1):
            try:
                self._write_status(force=True)
                break
            except TRANSIENT_ERRORS:
                if attempt == attempts:
                    raise
                time.sleep(1.0)
        log.info("capture of %s stopped", self.cluster.cluster)

    def _interrupted(self, exc: BaseException, delay: float) -> None:
        """The source or S3 went away: forget everything not yet flushed (it is read again from the checkpoint)."""
        self.state = "reconnecting"
        self._settle_flush()
        self._pending.clear()
        self.buffers.clear()
        self._buffered_rows = 0
        self._buffered_bytes = self._pending_bytes = 0
        self._completed = None
        detail = str(exc) or type(exc).__name__
        self._record_error(
            f"cluster {self.cluster.cluster}: source or S3 unreachable ({type(exc).__name__}: {detail}); "
            f"resuming from the checkpoint {self.checkpoint.get('gtid', '(none)')} in {delay:.0f} s",
            keep=False,
        )
        with contextlib.suppress(*TRANSIENT_ERRORS):
            self._write_status(force=True)

    def stop(self) -> None:
        self.stop_requested.set()

    # -- full loads --------------------------------------------------------------------------------------------

    def _enabled(self) -> list[TableMapping]:
        return self.cluster.enabled_tables

    def _catch_up_snapshots(self) -> None:
        """Read the shape of every enabled table; full-load those without a snapshot yet (all on the first run)."""
        snapshotted = self.checkpoint.get("tables", {})
        connection = self.connection.connect()
        try:
            for table in self._enabled():
                if table.source in snapshotted:
                    try:
                        self._install(
                            SourceTable(table, read_columns(connection, table, self.cluster.cluster))
                        )
                    except (CaptureError, UnsupportedColumn) as exc:
                        self._record_error(str(exc))
        finally:
            connection.close()
        missing = [t for t in self._enabled() if t.source not in snapshotted]
        if missing:
            self._full_load(missing, dict(snapshotted))

    def _full_load(self, tables: list[TableMapping], snapshotted: dict[str, Any]) -> None:
        self.state = "snapshotting"
        snapshot = full_load(
            self.cluster.cluster,
            self.connection,
            self.store,
            tables,
            load_file_rows=self.settings.load_file_rows,
        )
        for error in snapshot.errors:
            self._record_error(error)
        for shape in snapshot.tables.values():
            self._install(shape)
            snapshotted[shape.mapping.source] = {
                "snapshot_position": f"{snapshot.position.file}:{snapshot.position.pos}"
            }
        self.stats.rows["load"] += sum(snapshot.rows.values())
        self.stats.zero_dates += snapshot.zero_dates
        self.stats.files += sum(len(keys) for keys in snapshot.files.values())
        if "gtid" not in self.checkpoint:  # first run: stream from the snapshot
            position = snapshot.position
            self.checkpoint.update(gtid=snapshot.gtid, file=position.file, pos=position.pos)
        self.checkpoint["tables"] = snapshotted
        self._save_checkpoint()

    def _install(self, shape: SourceTable) -> SourceTable:
        self.tables[(shape.mapping.source_schema, shape.mapping.source_table)] = shape
        return shape

    # -- the binlog stream -------------------------------------------------------------------------------------

    def _stream(self) -> bool:
        """Stream until stopped (returns False) or until the mappings changed (returns True: restart)."""
        mapped = {(t.source_schema, t.source_table) for t in self._enabled()}
        cursor = StreamCursor(
            self.checkpoint.get("file", ""), _parse_gtid_state(self.checkpoint.get("gtid", ""))
        )
        # the exact text of single-byte character sets, learned from the source (capture.charsets)
        with contextlib.closing(self.connection.connect()) as source:
            learn_single_byte_tables(source)
        stream = self._open_binlog(mapped, cursor)
        self.state = "streaming"
        restart = False
        try:
            for event in stream:
                self._clear_passing_errors()
                self._on_event(event, stream, cursor, mapped)
                if not cursor.in_transaction:
                    if self.stop_requested.is_set():
                        break
                    if self._mappings_changed():
                        restart = True
                        break
                self._write_status()
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] == BINLOG_PURGED:
                raise self._purged(exc) from exc
            raise
        finally:
            stream.close()
        self._flush(force=True)
        return restart

    def _open_binlog(self, mapped: set[TableKey], cursor: StreamCursor) -> BinLogStreamReader:
        return BinLogStreamReader(
            connection_settings=self.connection.settings(),
            server_id=self._server_id,
            blocking=True,
            resume_stream=True,
            auto_position=",".join(cursor.gtid_state.values()) or None,
            is_mariadb=True,
            only_events=[
                WriteRowsEvent,
                UpdateRowsEvent,
                DeleteRowsEvent,
                XidEvent,
                QueryEvent,
                MariadbGtidEvent,
                RotateEvent,
                HeartbeatLogEvent,
            ],
            only_schemas=sorted({schema for schema, _ in mapped}),
            only_tables=sorted({table for _, table in mapped}),
            slave_heartbeat=self.settings.heartbeat_s,
            enable_logging=False,  # it would log its connection parameters
        )

    def _on_event(
        self, event: Any, stream: BinLogStreamReader, cursor: StreamCursor, mapped: set[TableKey]
    ) -> None:
        if isinstance(event, RotateEvent):
            cursor.file = event.next_binlog
        elif isinstance(event, MariadbGtidEvent):
            # rows left pending here: the reader reconnected inside a transaction, which comes again whole
            self._pending.clear()
            self._pending_bytes = 0
            cursor.tx_gtid, cursor.in_transaction = event.gtid, True
            self._tx_timestamp = event.timestamp
        elif isinstance(event, (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)):
            if (event.schema, event.table) in mapped:
                self._rows(event, BinlogPosition(cursor.file, event.packet.log_pos))
                self.stats.lag_s = max(0.0, time.time() - event.timestamp)
        elif isinstance(event, (XidEvent, QueryEvent)):
            if not (isinstance(event, QueryEvent) and event.query.strip().upper() == "BEGIN"):
                self._on_commit(event, stream, cursor)
        elif isinstance(event, HeartbeatLogEvent):
            self.stats.lag_s = 0.0
            if not cursor.in_transaction:
                self._maybe_flush()

    def _on_commit(self, event: Any, stream: BinLogStreamReader, cursor: StreamCursor) -> None:
        """A transaction ended (XID) or a statement was logged (DDL): its rows get their commit time."""
        if isinstance(event, QueryEvent):  # a statement: DDL may empty or refill a table without row events
            self._on_emptied(event, cursor)
            self._on_refilled(event, cursor)
        cursor.in_transaction = False
        if cursor.tx_gtid:
            cursor.gtid_state[cursor.tx_gtid.split("-", 1)[0]] = cursor.tx_gtid
            self._completed = {
                "gtid": ",".join(cursor.gtid_state.values()),
                "file": cursor.file,
                "pos": event.packet.log_pos,
                "commit_time": dt.datetime.fromtimestamp(event.timestamp, dt.UTC).isoformat(),
            }
            # where the reader reconnects by itself after a lost connection (it would otherwise start again from
            # the GTID it was opened with)
            stream.auto_position = self._completed["gtid"]
        self._commit_pending()
        self._maybe_flush()

    def _keyed_mappings(self, keys: list[TableKey]) -> list[TableMapping]:
        wanted = set(keys)
        return [t for t in self._enabled() if (t.source_schema, t.source_table) in wanted and t.primary_key]

    def _on_emptied(self, event: QueryEvent, cursor: StreamCursor) -> None:
        """`TRUNCATE`, `DROP TABLE` or a `RENAME` away of a mapped keyed table: its rows are gone from the mapped
        name without row events, so the capture lands one change (Op T, every column NULL) that the loader applies
        exactly. An append-only table keeps what it received."""
        for mapping in self._keyed_mappings(emptied_tables(str(event.query), _default_schema(event))):
            key = (mapping.source_schema, mapping.source_table)
            shape = self.tables.get(key)
            if shape is None:
                connection = self.connection.connect()
                try:
                    shape = self._install(
                        SourceTable(mapping, read_columns(connection, mapping, self.cluster.cluster))
                    )
                except CaptureError:
                    self._record_error(
                        f"{mapping.source} was emptied ({str(event.query)[:80]!r}) before the capture knew its "
                        "columns: re-snapshot it (cdc resnapshot) to drop its rows in BigQuery"
                    )
                    continue
                finally:
                    connection.close()
            self._tx_timestamp = event.timestamp
            position = BinlogPosition(cursor.file, event.packet.log_pos)
            self._pending.append((key, TRUNCATE_OP, [None] * len(shape.names), position.sequence(0)))
            log.info(
                "cluster %s: %s emptied at %s:%s",
                self.cluster.cluster,
                mapping.source,
                cursor.file,
                position.pos,
            )

    def _on_refilled(self, event: QueryEvent, cursor: StreamCursor) -> None:
        """A statement that fills a mapped keyed table without row events (an `ALTER TABLE` adding a column with a
        default, NOT NULL or generated; a table renamed onto the mapped name): the capture asks for a re-snapshot
        of it, which the Dagster sensor `resnapshot_requests` runs - in both load modes."""
        position = f"{cursor.file}:{event.packet.log_pos}"
        for mapping in self._keyed_mappings(refilled_tables(str(event.query), _default_schema(event))):
            request_resnapshot(
                self.store.control,
                self.cluster.cluster,
                mapping.source,
                f"rows given values without row events: {str(event.query)[:120]}",
                position,
            )
            log.info(
                "cluster %s: re-snapshot of %s requested (%s)", self.cluster.cluster, mapping.source, position
            )

    def _purged(self, exc: pymysql.err.OperationalError) -> CaptureError:
        name = self.cluster.cluster
        return CaptureError(
            f"cluster {name}: the source no longer has the binlog at the capture's checkpoint "
            f"({self.checkpoint.get('gtid')}): it was purged, so the changes since cannot be read. "
            f"Re-snapshot the cluster: `cdc capture reset --cluster {name}` (its capture starts again with a "
            f"new full load; streaming resumes from it), then `cdc resnapshot --cluster {name}` (each table is "
            f"re-derived from the source: rows deleted meanwhile disappear). Source said: {exc.args[1]}"
        )

    def _rows(self, event: Any, position: BinlogPosition) -> None:
        key = (event.schema, event.table)
        shape = self._shape_for(key, event)
        pending = self._pending
        for index, row in enumerate(event.rows):
            if isinstance(event, UpdateRowsEvent):
                after = self._normalise(shape, row["after_values"], row.get("after_none_sources"))
                old_key = [row["before_values"].get(shape.names[i]) for i in shape.key_indexes]
                if old_key != [row["after_values"].get(shape.names[i]) for i in shape.key_indexes]:
                    before = self._normalise(shape, row["before_values"], row.get("before_none_sources"))
                    # A primary-key change: the old key is deleted, the new one inserted (same transaction order).
                    pending.append((key, "D", before, position.sequence(2 * index)))
                    pending.append((key, "I", after, position.sequence(2 * index + 1)))
                else:
                    pending.append((key, "U", after, position.sequence(2 * index + 1)))
            else:
                op = "I" if isinstance(event, WriteRowsEvent) else "D"
                values = self._normalise(shape, row["values"], row.get("none_sources"))
                pending.append((key, op, values, position.sequence(2 * index + 1)))
        self._pending_bytes += event.event_size
        if self._buffer_full(len(pending), self._pending_bytes):
            self._commit_pending()  # a huge transaction: hand its rows to the table buffers early

    def _normalise(self, shape: SourceTable, row: Any, none_sources: dict[str, str] | None) -> list[Any]:
        values, zero_dates = shape.normalise(row, none_sources)
        self.stats.zero_dates += zero_dates
        return values

    def _shape_for(self, key: TableKey, event: Any) -> SourceTable:
        """The table's columns for this rows event, re-read when the binlog's table map of the table changed
        (names, types, or anything else that changes how values decode: `table_map_signature`) and when the first
        event after columns were read from information_schema was logged with other types (the capture is behind
        a type change). Other statements (DDL of other tables, GRANT, ANALYZE ...) cost nothing."""
        shape = self.tables.get(key)
        columns = event.columns
        if shape is not None and columns is shape.table_map:
            return shape  # the same table map as the last event's
        signature = table_map_signature(columns)
        if (
            shape is None
            or shape.names != [column.name for column in columns]
            or shape.signature not in (None, signature)
            or (shape.signature is None and not shape.agrees_with(columns))
        ):
            shape = self._follow_schema_change(key, event)
        shape.signature = signature
        shape.table_map = columns
        return shape

    def _follow_schema_change(self, key: TableKey, event: Any) -> SourceTable:
        """The binlog's column list differs from ours: flush the old shape, then take the new one."""
        old = self.tables.get(key)
        mapping = (
            old.mapping
            if old
            else next(t for t in self._enabled() if (t.source_schema, t.source_table) == key)
        )
        self._commit_pending()
        buffer = self.buffers.get(key)
        if buffer and buffer.rows:
            self._flush(force=True, at_boundary=False)
        connection = self.connection.connect()
        try:
            current = {spec.name: spec for spec in read_columns(connection, mapping, self.cluster.cluster)}
        except CaptureError:
            current = {}
        finally:
            connection.close()
        shape = SourceTable(mapping, columns_of_event(mapping, current, event.columns))
        log.info("cluster %s: %s.%s now has columns %s", self.cluster.cluster, key[0], key[1], shape.names)
        return self._install(shape)

    # -- buffers, flushes, checkpoints -------------------------------------------------------------------------

    def _commit_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        stamp = commit_timestamp_text(dt.datetime.fromtimestamp(self._tx_timestamp or time.time(), dt.UTC))
        now = time.time()
        for key, op, values, sequence in pending:
            buffer = self.buffers.get(key)
            shape = self.tables[key]
            if buffer is None or buffer.columns is not shape.columns:
                if buffer is not None and buffer.rows:  # the old columns' rows: a file of their own
                    self._wait_for_flush()
                    self._write_files([self._take_file(key, buffer)])
                buffer = self.buffers[key] = TableBuffer(key[0], key[1], shape.columns)
            if buffer.first_buffered is None:
                buffer.first_buffered = now
            buffer.rows.append((op, stamp, *values, sequence))
            self.stats.rows[op] += 1
        self._buffered_rows += len(pending)
        self._buffered_bytes += self._pending_bytes
        self._pending_bytes = 0
        pending.clear()

    def _maybe_flush(self) -> None:
        oldest = min(
            (b.first_buffered for b in self.buffers.values() if b.first_buffered is not None), default=None
        )
        due = oldest is not None and time.time() >= flush_time(oldest, self.settings.flush_interval_s)
        if self._flush_in_flight is not None and self._flush_in_flight.done():
            self._wait_for_flush()  # a failed upload surfaces now, not at the next flush
        if due or self._buffer_full(self._buffered_rows, self._buffered_bytes):
            self._flush()
        elif (
            oldest is None
            and self._flush_in_flight is None
            and time.monotonic() - self._last_flush >= self.settings.flush_interval_s
        ):
            self._flush()  # only unmapped traffic: checkpoint, so a restart does not re-read it

    def _buffer_full(self, rows: int, binlog_bytes: int) -> bool:
        return rows >= self.settings.flush_rows or binlog_bytes >= self.settings.flush_bytes

    def _flush(self, force: bool = False, at_boundary: bool = True) -> None:
        """Hand every buffered table to the flusher, which writes them (concurrently) and then (at a transaction
        boundary) checkpoints what is now in S3, while this thread reads on. The flush before it must have
        finished first (its error is raised here: the rows are read again from the checkpoint). `force` waits for
        this one too (before a stop, a schema change or a full load)."""
        files = [self._take_file(key, buffer) for key, buffer in self.buffers.items() if buffer.rows]
        self._buffered_rows = 0
        self._buffered_bytes = 0
        self._last_flush = time.monotonic()
        completed = dict(self._completed) if at_boundary and self._completed else None
        self._wait_for_flush()
        self._flush_in_flight = self._flusher.submit(self._write_flush, files, completed, force)
        if force:
            self._wait_for_flush()

    def _write_flush(
        self, files: list[tuple[str, pa.Table, dict[str, str]]], completed: dict[str, Any] | None, force: bool
    ) -> None:
        flushed = self._write_files(files)
        self.stats.recent.append((time.monotonic(), flushed))
        if completed is not None:
            self._advance_checkpoint(completed)
        if flushed or force:
            self._write_status(force=True)

    def _wait_for_flush(self) -> None:
        """Wait for the flush in flight, if any; raise its error."""
        in_flight, self._flush_in_flight = self._flush_in_flight, None
        if in_flight is not None:
            in_flight.result()

    def _settle_flush(self) -> None:
        """Let the flush in flight end before the stream starts again; its error is not raised (its rows are read
        again from the checkpoint, which it did not move)."""
        with contextlib.suppress(Exception):
            self._wait_for_flush()

    def _write_files(self, files: list[tuple[str, pa.Table, dict[str, str]]]) -> int:
        """Upload files made by `_take_file` concurrently and wait for all (the first error is raised); the rows."""
        uploads = [
            self._uploads.submit(self.store.put_file, object_key, parquet_bytes(rows, metadata))
            for object_key, rows, metadata in files
        ]
        for upload in uploads:
            upload.result()
        self.stats.files += len(files)
        return sum(rows.num_rows for _, rows, _ in files)

    def _take_file(self, key: TableKey, buffer: TableBuffer) -> tuple[str, pa.Table, dict[str, str]]:
        """A table's buffered rows as its next file: (S3 key, rows, Parquet metadata); the buffer is emptied (the
        rows are read again from the checkpoint if the upload fails)."""
        object_key = self.store.cdc_key(key[0], key[1], dt.datetime.now(dt.UTC), self.settings.date_folders)
        metadata = {
            "cdc.cluster": self.cluster.cluster,
            "cdc.first_sequence": buffer.rows[0][-1],
            "cdc.last_sequence": buffer.rows[-1][-1],
        }
        rows = buffer.to_arrow()
        buffer.rows = []
        buffer.first_buffered = None
        return object_key, rows, metadata

    def _advance_checkpoint(self, completed: dict[str, Any]) -> None:
        """Checkpoint a complete transaction; the caller guarantees every row up to it is in S3."""
        if completed.get("gtid") != self.checkpoint.get("gtid"):
            self.checkpoint.update(completed)
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        self.checkpoint["cluster"] = self.cluster.cluster
        self.checkpoint["saved_at"] = dt.datetime.now(dt.UTC).isoformat()
        self.store.write_json("checkpoints", self.cluster.cluster, self.checkpoint)

    # -- mappings, errors, status ------------------------------------------------------------------------------

    def _mappings_changed(self) -> bool:
        if self.mappings_dir is None:
            return False
        if time.monotonic() - self._last_mapping_check < self.settings.mapping_check_interval_s:
            return False
        self._last_mapping_check = time.monotonic()
        try:
            cluster = load_mappings(self.mappings_dir).cluster(self.cluster.cluster)
        except Exception as exc:
            self._record_error(f"mappings not reloaded, keeping the running ones: {exc}")
            return False
        if cluster == self.cluster:
            return False
        log.info("cluster %s: mappings changed; following them", self.cluster.cluster)
        self.cluster = cluster
        return True

    def _record_error(self, message: str, keep: bool = True) -> None:
        """Log an error and show it in the status; `keep=False` for a passing condition (shown until the source
        answers again)."""
        log.error(message)
        if message not in self.errors:
            self.errors = [*self.errors, message][-20:]
        if not keep:
            self._passing_errors.add(message)

    def _clear_passing_errors(self) -> None:
        if self._passing_errors:  # the source answers again
            self.errors = [e for e in self.errors if e not in self._passing_errors]
            self._passing_errors.clear()

    def _write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < self.settings.status_interval_s:
            return
        self._last_status = now
        self.store.write_json("status", self.cluster.cluster, self.status_document())

    def status_document(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster.cluster,
            "state": self.state,
            "pid": os.getpid(),
            "updated_at": dt.datetime.now(dt.UTC).isoformat(),
            "lag_seconds": round(self.stats.lag_s, 3),
            "rows_per_second": round(self.stats.rows_per_second(), 1),
            "rows": dict(self.stats.rows),
            "zero_dates": self.stats.zero_dates,
            "files": self.stats.files,
            "checkpoint": {k: v for k, v in self.checkpoint.items() if k != "tables"},
            "tables": len(self.tables),
            "errors": self.errors,
        }


def flush_time(first_buffered: float, interval_s: float) -> float:
    """When rows first buffered at `first_buffered` (epoch seconds) are flushed: at the next multiple of the
    interval on the clock, so every cluster's capture flushes at the same moments and the SQS sensor takes a whole
    flush's files in one tick (docs/design.md, "Capture"); a row waits half an interval on average, as before."""
    return (first_buffered // interval_s + 1) * interval_s


def _default_schema(event: QueryEvent) -> str:
    """The database a statement ran in (its unqualified table names belong to it)."""
    return event.schema.decode() if isinstance(event.schema, bytes) else str(event.schema or "")


def _parse_gtid_state(state: str) -> dict[str, str]:
    """'0-1-10,1-2-5' -> {'0': '0-1-10', '1': '1-2-5'} (one GTID per replication domain)."""
    return {gtid.split("-", 1)[0]: gtid for gtid in (g.strip() for g in state.split(",")) if gtid}
