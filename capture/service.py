"""The capture service of one cluster: consistent full load, then the binlog, into DMS-layout Parquet in S3.

Guarantees:
- The full load reads every mapped table inside one consistent snapshot and records the snapshot's binlog
  position; streaming starts from exactly that position. A table mapped later is snapshotted when it appears;
  its snapshot rows carry their snapshot's sequence, so changes streamed from before it sort before them.
- Rows are buffered per table and flushed every `flush_interval_s` or `flush_rows`, whichever comes first, always
  at a transaction boundary. The checkpoint (GTID + file/position of the last fully flushed transaction) is
  written to S3 only after that flush's files are in S3. After a crash the stream resumes at the checkpoint; a
  change flushed before the crash but after the checkpoint is written again with the same change sequence.
- Schema changes are followed per table from the binlog's own column list (FULL row metadata).
- SIGTERM flushes and checkpoints before exit. Status (lag, rows/s, last checkpoint) goes to S3 every few seconds.
- A source or S3 that cannot be reached (a restart, a network cut) is waited out: the capture drops what it has
  not flushed, says so in its status, and resumes from its checkpoint with backoff (1 s doubling to 30 s). Only a
  condition it cannot continue from (`CaptureError`: the binlog purged past the checkpoint) stops it, with the
  error in its status and, when CDC_ALERT_WEBHOOK_URL is set, an alert.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pymysql
from botocore.exceptions import BotoCoreError, ClientError
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import (
    HeartbeatLogEvent,
    MariadbGtidEvent,
    QueryEvent,
    RotateEvent,
    XidEvent,
)
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

import capture.binlog_fixes  # noqa: F401 - corrects the reader's TIME2 decoding
from capture import layout
from capture.columns import ColumnSpec, UnsupportedColumn, spec_from_table_map
from capture.position import BinlogPosition
from capture.sink import S3Store, TableBuffer, parquet_bytes
from cdc.mappings import ClusterMapping, TableMapping, load_mappings
from cdc.progress import Progress

log = logging.getLogger("cdc.capture")


def begin_consistent_snapshot(cursor: Any) -> BinlogPosition | None:
    """Start a UTC, REPEATABLE READ transaction WITH CONSISTENT SNAPSHOT; return the binlog position it is
    consistent with (MariaDB reports it; None where the server does not)."""
    cursor.execute("SET SESSION time_zone = '+00:00'")
    cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
    cursor.execute("SHOW STATUS WHERE Variable_name IN ('binlog_snapshot_file', 'binlog_snapshot_position')")
    status = {str(name).lower(): value for name, value in cursor.fetchall()}
    if not status.get("binlog_snapshot_file"):
        return None
    return BinlogPosition(status["binlog_snapshot_file"], int(status["binlog_snapshot_position"]))


@dataclass(frozen=True)
class MySQLConnection:
    host: str
    port: int
    user: str
    password: str

    def settings(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "passwd": self.password}

    def connect(self, **extra: Any) -> pymysql.connections.Connection:
        return pymysql.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, charset="utf8mb4", **extra
        )


@dataclass(frozen=True)
class CaptureSettings:
    flush_interval_s: float = 2.0  # DMS's CdcMaxBatchInterval is 60 s; seconds of latency here
    flush_rows: int = 50_000  # per flush, over all tables
    date_folders: bool = True  # DMS DatePartitionEnabled
    load_file_rows: int = 100_000  # rows per LOAD file
    heartbeat_s: float = 1.0
    status_interval_s: float = 2.0
    mapping_check_interval_s: float = 5.0


class CaptureError(RuntimeError):
    """A condition the capture cannot continue from; the message says what to do."""


# A source or S3 that cannot be reached for now: waited out, then the stream resumes from the checkpoint.
TRANSIENT_ERRORS = (
    pymysql.err.OperationalError,
    pymysql.err.InterfaceError,
    OSError,
    BotoCoreError,
    ClientError,
)
MAX_RETRY_DELAY_S = 30.0


@dataclass
class _Table:
    mapping: TableMapping
    columns: list[ColumnSpec]
    normalisers: list[Any]
    key_indexes: list[int]
    names: list[str] = field(default_factory=list)
    temporal_indexes: list[int] = field(default_factory=list)
    active: list[tuple[int, str, Any]] = field(
        default_factory=list
    )  # (index, name, normaliser) that change values
    signature: tuple[tuple[str, int], ...] | None = None  # the binlog's (name, type) per column, once seen
    stale: bool = False  # a DDL statement passed since the columns were read

    def __post_init__(self) -> None:
        self.names = [c.name for c in self.columns]
        self.temporal_indexes = [i for i, c in enumerate(self.columns) if c.temporal]
        self.active = [
            (i, c.name, n) for i, (c, n) in enumerate(zip(self.columns, self.normalisers, strict=True)) if n
        ]


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
        window = [(t, n) for t, n in self.recent if now - t <= 10]
        self.recent = window
        if not window:
            return 0.0
        return sum(n for _, n in window) / max(now - window[0][0], 1.0)


class ClusterCapture:
    def __init__(
        self,
        cluster: ClusterMapping,
        connection: MySQLConnection,
        store: S3Store,
        settings: CaptureSettings | None = None,
        mappings_dir: Any = None,
    ):
        self.cluster = cluster
        self.connection = connection
        self.store = store
        self.settings = settings or CaptureSettings()
        self.mappings_dir = mappings_dir
        self.stop_requested = threading.Event()
        self.stats = CaptureStats()
        self.state = "starting"
        self.tables: dict[tuple[str, str], _Table] = {}
        self.buffers: dict[tuple[str, str], TableBuffer] = {}
        self.checkpoint: dict[str, Any] = {}
        self.errors: list[str] = []
        self._passing_errors: set[str] = set()  # errors that clear once the capture writes to S3 again
        self.loaded_keys: dict[str, list[str]] = {}  # per source table, the LOAD files its snapshot wrote
        self.loaded_rows: dict[str, int] = {}
        self._buffered_rows = 0
        # rows of the open transaction, not yet given a commit time: (table key, op, values, sequence)
        self._pending: list[tuple[tuple[str, str], str, list[Any], str]] = []
        self._completed: dict[str, Any] | None = None  # position of the last complete transaction seen
        # MariaDB writes a transaction's GTID event at commit, with the commit time (row events carry statement times)
        self._tx_timestamp: float | None = None
        self._last_checkpoint = time.monotonic()
        self._last_status = 0.0
        self._last_mapping_check = time.monotonic()
        self._server_id = 100_000 + zlib.crc32(cluster.cluster.encode()) % 1_000_000
        self.report_progress: Callable[[str], None] = log.info  # progress lines of full loads

    # -- schema ------------------------------------------------------------------------------------------------

    def _read_columns(self, connection: Any, table: TableMapping) -> list[ColumnSpec]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT COLUMN_NAME, LOWER(COLUMN_TYPE), IS_NULLABLE = 'YES' FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                (table.source_schema, table.source_table),
            )
            rows = cursor.fetchall()
        if not rows:
            raise CaptureError(
                f"cluster {self.cluster.cluster}: mapped table {table.source} does not exist at the source; "
                "create it or fix the mapping (cdc mappings validate checks the file, not the source)"
            )
        specs = [
            ColumnSpec(
                name=name, column_type=ctype, nullable=bool(nullable), override=table.type_overrides.get(name)
            )
            for name, ctype, nullable in rows
        ]
        self._check_columns(table, specs)
        return specs

    def _check_columns(self, table: TableMapping, specs: list[ColumnSpec]) -> None:
        names = {spec.name for spec in specs}
        clash = names & set(layout.ADDED_COLUMNS)
        if clash:
            raise CaptureError(
                f"{table.source}: column(s) {sorted(clash)} collide with the columns the capture adds"
            )
        for column in (*table.primary_key, *table.type_overrides):
            if column not in names:
                raise CaptureError(f"{table.source}: mapped column {column!r} does not exist at the source")
        for spec in specs:
            spec.arrow_type()  # raises UnsupportedColumn naming the column

    def _install(self, table: TableMapping, specs: list[ColumnSpec]) -> _Table:
        entry = _Table(
            mapping=table,
            columns=specs,
            normalisers=[spec.normaliser() for spec in specs],
            key_indexes=[[s.name for s in specs].index(k) for k in table.primary_key],
        )
        self.tables[(table.source_schema, table.source_table)] = entry
        return entry

    # -- full load ---------------------------------------------------------------------------------------------

    def snapshot(
        self, tables: list[TableMapping], keep_previous_loads: bool = False, strict: bool = False
    ) -> tuple[BinlogPosition, str]:
        """Full load of ``tables`` from one consistent snapshot; returns its binlog position and GTID state.

        The capture replaces a table's earlier LOAD files; with ``keep_previous_loads`` (a re-snapshot) they stay
        and the new files are numbered after them. A table that cannot be read is recorded as an error and
        skipped, or with ``strict`` raises. The keys written are in ``self.loaded_keys`` per table."""
        self.state = "snapshotting"
        connection = self.connection.connect(cursorclass=pymysql.cursors.SSCursor)
        try:
            with connection.cursor() as cursor:
                snapshot_position = begin_consistent_snapshot(cursor)
                if snapshot_position is None:
                    raise CaptureError(
                        f"cluster {self.cluster.cluster}: the server reports no binlog_snapshot_file; the capture "
                        "needs MariaDB (use AWS DMS for MySQL/Aurora sources)"
                    )
                position = snapshot_position
                cursor.execute("SELECT BINLOG_GTID_POS(%s, %s)", (position.file, position.pos))
                gtid = cursor.fetchone()[0] or ""
            for table in tables:
                try:
                    entry = self._install(table, self._read_columns(connection, table))
                except (CaptureError, UnsupportedColumn) as exc:
                    if strict:
                        raise
                    self._record_error(str(exc))
                    continue
                self._load_table(connection, entry, position, keep_previous_loads)
            connection.commit()
        finally:
            connection.close()
        log.info(
            "cluster %s: snapshot at %s:%s (gtid %s)", self.cluster.cluster, position.file, position.pos, gtid
        )
        return position, gtid

    def _load_table(
        self, connection: Any, entry: _Table, position: BinlogPosition, keep_previous: bool = False
    ) -> None:
        mapping = entry.mapping
        started = time.monotonic()
        first_number = 0
        if keep_previous:
            first_number = self.store.last_load_number(mapping.source_schema, mapping.source_table)
        else:
            self.store.delete_load_files(mapping.source_schema, mapping.source_table)
        written = self.loaded_keys[mapping.source] = []
        select = ", ".join(
            f"CAST(`{c.name}` AS CHAR)" if c.data_type == "time" else f"`{c.name}`" for c in entry.columns
        )
        order = " ORDER BY " + ", ".join(f"`{k}`" for k in mapping.primary_key) if mapping.primary_key else ""
        stamp = layout.commit_timestamp_text(dt.datetime.now(dt.UTC))
        number, total = 0, 0
        with (
            connection.cursor() as cursor
        ):  # InnoDB's row estimate, for progress (read before the stream opens)
            cursor.execute(
                "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
                (mapping.source_schema, mapping.source_table),
            )
            estimate = cursor.fetchone()
        progress = Progress(
            f"full load of {mapping.source} (rows)", int(estimate[0] or 0) if estimate else None
        )
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {select} FROM `{mapping.source_schema}`.`{mapping.source_table}`{order}")  # noqa: S608
            while True:
                batch = cursor.fetchmany(self.settings.load_file_rows)
                if not batch and number > 0:
                    break
                buffer = TableBuffer(mapping.source_schema, mapping.source_table, entry.columns)
                # Each row gets the snapshot's position and its ordinal in key order: unique and repeatable.
                buffer.rows = [
                    ("I", stamp, *self._normalise(entry, row, None), position.sequence(total + offset))
                    for offset, row in enumerate(batch)
                ]
                number += 1
                total += len(batch)
                key = layout.load_file_key(
                    self.store.prefix, mapping.source_schema, mapping.source_table, first_number + number
                )
                written.append(key)
                self.store.put_file(
                    key, parquet_bytes(buffer.to_arrow(), self._file_metadata(position, position))
                )
                self.stats.files += 1
                self.report_progress(progress.advance(len(batch)))
                if not batch:
                    break
        self.stats.rows["load"] += total
        self.loaded_rows[mapping.source] = total
        log.info(
            "cluster %s: full load of %s: %d rows in %d file(s), %.1f s",
            self.cluster.cluster,
            mapping.source,
            total,
            number,
            time.monotonic() - started,
        )

    def _normalise(self, entry: _Table, row: Any, none_sources: dict[str, str] | None) -> list[Any]:
        """Exact values in column order from a binlog row (dict) or a snapshot row (tuple); counts zero dates.

        The reader says why it returned None in ``none_sources`` (NULL, empty SET, out-of-range date)."""
        values = [row.get(name) for name in entry.names] if isinstance(row, dict) else list(row)
        sources = none_sources or {}
        for index in entry.temporal_indexes:
            raw = values[index]
            if entry.columns[index].zero_date(
                raw, sources.get(entry.names[index], "") if raw is None else ""
            ):
                self.stats.zero_dates += 1
        for index, name, normalise in entry.active:
            raw = values[index]
            values[index] = normalise(raw, sources.get(name, "") if raw is None else "")
        return values

    def _file_metadata(self, first: BinlogPosition, last: BinlogPosition) -> dict[str, str]:
        return {
            "cdc.cluster": self.cluster.cluster,
            "cdc.first_position": f"{first.file}:{first.pos}",
            "cdc.last_position": f"{last.file}:{last.pos}",
        }

    # -- streaming ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Snapshot if needed, then stream until stop() or SIGTERM; wait out an unreachable source or S3."""
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
        self.state = "stopped"
        self._write_status(force=True)

    def _interrupted(self, exc: BaseException, delay: float) -> None:
        """The source or S3 went away: forget everything not yet flushed (it is read again from the checkpoint)."""
        self.state = "reconnecting"
        self._pending.clear()
        self.buffers.clear()
        self._buffered_rows = 0
        self._completed = None
        detail = str(exc) or type(exc).__name__
        self._record_error(
            f"cluster {self.cluster.cluster}: source or S3 unreachable ({type(exc).__name__}: {detail}); "
            f"resuming from the checkpoint {self.checkpoint.get('gtid', '(none)')} in {delay:.0f} s",
            keep=False,
        )
        with contextlib.suppress(*TRANSIENT_ERRORS):
            self._write_status(force=True)

    def _enabled(self) -> list[TableMapping]:
        return self.cluster.enabled_tables

    def _catch_up_snapshots(self) -> None:
        """Snapshot every enabled table that has none yet (all of them on the first run)."""
        snapshotted = self.checkpoint.get("tables", {})
        missing = [t for t in self._enabled() if t.source not in snapshotted]
        connection = self.connection.connect()
        try:
            for table in self._enabled():
                if table.source in snapshotted:
                    try:
                        self._install(table, self._read_columns(connection, table))
                    except (CaptureError, UnsupportedColumn) as exc:
                        self._record_error(str(exc))
        finally:
            connection.close()
        if not missing:
            return
        position, gtid = self.snapshot(missing)
        tables = dict(snapshotted)
        for table in missing:
            if (table.source_schema, table.source_table) in self.tables:
                tables[table.source] = {"snapshot_position": f"{position.file}:{position.pos}"}
        if "gtid" not in self.checkpoint:  # first run: stream from the snapshot
            self.checkpoint.update(gtid=gtid, file=position.file, pos=position.pos)
        self.checkpoint["tables"] = tables
        self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        self.checkpoint["cluster"] = self.cluster.cluster
        self.checkpoint["saved_at"] = dt.datetime.now(dt.UTC).isoformat()
        self.store.write_json("checkpoints", self.cluster.cluster, self.checkpoint)

    def _stream(self) -> bool:
        """Stream until stopped (returns False) or until the mappings changed (returns True: restart)."""
        mapped = {(t.source_schema, t.source_table) for t in self._enabled()}
        gtid_state = _parse_gtid_state(self.checkpoint.get("gtid", ""))
        stream = BinLogStreamReader(
            connection_settings=self.connection.settings(),
            server_id=self._server_id,
            blocking=True,
            resume_stream=True,
            auto_position=",".join(gtid_state.values()) or None,
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
        self.state = "streaming"
        current_file = self.checkpoint.get("file", "")
        tx_gtid: str | None = None
        in_transaction = False
        restart = False
        try:
            for event in stream:
                if self._passing_errors:  # the source answers again
                    self.errors = [e for e in self.errors if e not in self._passing_errors]
                    self._passing_errors.clear()
                if isinstance(event, RotateEvent):
                    current_file = event.next_binlog
                elif isinstance(event, MariadbGtidEvent):
                    # rows left pending here: the reader reconnected inside a transaction, which comes again whole
                    self._pending.clear()
                    tx_gtid, in_transaction = event.gtid, True
                    self._tx_timestamp = event.timestamp
                elif isinstance(event, (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)):
                    if (event.schema, event.table) in mapped:
                        self._rows(event, BinlogPosition(current_file, event.packet.log_pos))
                        self.stats.lag_s = max(0.0, time.time() - event.timestamp)
                elif isinstance(event, (XidEvent, QueryEvent)):
                    if isinstance(event, QueryEvent) and event.query.strip().upper() == "BEGIN":
                        continue
                    if isinstance(event, QueryEvent):  # DDL: the next rows of each table re-read its columns
                        for entry in self.tables.values():
                            entry.stale = True
                    in_transaction = False
                    if tx_gtid:
                        domain = tx_gtid.split("-", 1)[0]
                        gtid_state[domain] = tx_gtid
                        self._completed = {
                            "gtid": ",".join(gtid_state.values()),
                            "file": current_file,
                            "pos": event.packet.log_pos,
                            "commit_time": dt.datetime.fromtimestamp(event.timestamp, dt.UTC).isoformat(),
                        }
                        # where the reader reconnects by itself after a lost connection (it would otherwise start
                        # again from the GTID it was opened with)
                        stream.auto_position = self._completed["gtid"]
                    self._commit_pending()
                    self._maybe_flush()
                elif isinstance(event, HeartbeatLogEvent):
                    self.stats.lag_s = 0.0
                    if not in_transaction:
                        self._maybe_flush()
                if not in_transaction:
                    if self.stop_requested.is_set():
                        break
                    if self._mappings_changed():
                        restart = True
                        break
                self._write_status()
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] == 1236:
                name = self.cluster.cluster
                raise CaptureError(
                    f"cluster {name}: the source no longer has the binlog at the capture's checkpoint "
                    f"({self.checkpoint.get('gtid')}): it was purged, so the changes since cannot be read. "
                    f"Re-snapshot the cluster: `cdc capture reset --cluster {name}`, start the capture again (a new "
                    f"full load; streaming resumes from it), then `cdc resnapshot --cluster {name}` (each table is "
                    f"re-derived from the source: rows deleted meanwhile disappear). Source said: {exc.args[1]}"
                ) from exc
            raise
        finally:
            stream.close()
        self._flush(force=True)
        return restart

    def _rows(self, event: Any, position: BinlogPosition) -> None:
        key = (event.schema, event.table)
        entry = self.tables.get(key)
        # The columns are re-read after a DDL statement (a MODIFY keeps the names but changes the type), and when
        # the binlog's column names or types differ from the last rows event's (a DDL before a restart).
        signature = tuple((column.name, column.type) for column in event.columns)
        if (
            entry is None
            or entry.stale
            or entry.names != [column.name for column in event.columns]
            or entry.signature not in (None, signature)
        ):
            entry = self._follow_schema_change(key, event)
        entry.signature = signature
        pending = self._pending
        for index, row in enumerate(event.rows):
            if isinstance(event, UpdateRowsEvent):
                after = self._normalise(entry, row["after_values"], row.get("after_none_sources"))
                old_key = [row["before_values"].get(entry.names[i]) for i in entry.key_indexes]
                if old_key != [row["after_values"].get(entry.names[i]) for i in entry.key_indexes]:
                    before = self._normalise(entry, row["before_values"], row.get("before_none_sources"))
                    # A primary-key change: the old key is deleted, the new one inserted (same transaction order).
                    pending.append((key, "D", before, position.sequence(2 * index)))
                    pending.append((key, "I", after, position.sequence(2 * index + 1)))
                else:
                    pending.append((key, "U", after, position.sequence(2 * index + 1)))
            else:
                op = "I" if isinstance(event, WriteRowsEvent) else "D"
                values = self._normalise(entry, row["values"], row.get("none_sources"))
                pending.append((key, op, values, position.sequence(2 * index + 1)))
        if len(pending) >= self.settings.flush_rows:
            self._commit_pending()  # a huge transaction: hand its rows to the table buffers early

    def _follow_schema_change(self, key: tuple[str, str], event: Any) -> _Table:
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
            current = {spec.name: spec for spec in self._read_columns(connection, mapping)}
        except CaptureError:
            current = {}
        finally:
            connection.close()
        specs = []
        for column in event.columns:
            spec = current.get(column.name) or spec_from_table_map(column)
            if mapping.type_overrides.get(column.name) and spec.override is None:
                spec = ColumnSpec(
                    spec.name, spec.column_type, spec.nullable, mapping.type_overrides[column.name]
                )
            specs.append(spec)
        log.info(
            "cluster %s: %s.%s now has columns %s",
            self.cluster.cluster,
            key[0],
            key[1],
            [s.name for s in specs],
        )
        return self._install(mapping, specs)

    def _commit_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        stamp = layout.commit_timestamp_text(
            dt.datetime.fromtimestamp(self._tx_timestamp or time.time(), dt.UTC)
        )
        now = time.monotonic()
        for key, op, values, sequence in pending:
            buffer = self.buffers.get(key)
            entry = self.tables[key]
            if buffer is None or buffer.columns is not entry.columns:
                if buffer is not None and buffer.rows:
                    self._flush_table(key, buffer)
                buffer = self.buffers[key] = TableBuffer(key[0], key[1], entry.columns)
            if buffer.first_buffered is None:
                buffer.first_buffered = now
            buffer.rows.append((op, stamp, *values, sequence))
            self.stats.rows[op] += 1
        self._buffered_rows += len(pending)
        pending.clear()

    def _maybe_flush(self) -> None:
        now = time.monotonic()
        oldest = min(
            (b.first_buffered for b in self.buffers.values() if b.first_buffered is not None), default=None
        )
        due = oldest is not None and now - oldest >= self.settings.flush_interval_s
        if due or self._buffered_rows >= self.settings.flush_rows:
            self._flush()
        elif oldest is None and now - self._last_checkpoint >= self.settings.flush_interval_s:
            self._advance_checkpoint()  # only unmapped traffic: move on so a restart does not re-read it

    def _flush(self, force: bool = False, at_boundary: bool = True) -> None:
        """Write every buffered table, then (at a transaction boundary) checkpoint what is now in S3."""
        flushed = 0
        for key, buffer in self.buffers.items():
            if buffer.rows:
                flushed += self._flush_table(key, buffer)
        self._buffered_rows = 0
        self.stats.recent.append((time.monotonic(), flushed))
        if at_boundary:
            self._advance_checkpoint()
        if flushed or force:
            self._write_status(force=True)

    def _advance_checkpoint(self) -> None:
        """Checkpoint the last complete transaction; callers guarantee every row up to it is in S3."""
        self._last_checkpoint = time.monotonic()
        completed = self._completed
        if completed and completed.get("gtid") != self.checkpoint.get("gtid"):
            self.checkpoint.update(completed)
            self._save_checkpoint()

    def _flush_table(self, key: tuple[str, str], buffer: TableBuffer) -> int:
        written = dt.datetime.now(dt.UTC)
        object_key = self.store.cdc_key(key[0], key[1], written, self.settings.date_folders)
        first = buffer.rows[0][-1]
        last = buffer.rows[-1][-1]
        metadata = {
            "cdc.cluster": self.cluster.cluster,
            "cdc.first_sequence": first,
            "cdc.last_sequence": last,
        }
        self.store.put_file(object_key, parquet_bytes(buffer.to_arrow(), metadata))
        count = len(buffer.rows)
        buffer.rows = []
        buffer.first_buffered = None
        self.stats.files += 1
        return count

    # -- mappings, status, stop --------------------------------------------------------------------------------

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
            self.errors.append(message)
            self.errors = self.errors[-20:]
        if not keep:
            self._passing_errors.add(message)

    def _write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < self.settings.status_interval_s:
            return
        self._last_status = now
        self.store.write_json(
            "status",
            self.cluster.cluster,
            {
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
            },
        )

    def stop(self) -> None:
        self.stop_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())


def _parse_gtid_state(state: str) -> dict[str, str]:
    """'0-1-10,1-2-5' -> {'0': '0-1-10', '1': '1-2-5'} (one GTID per replication domain)."""
    return {gtid.split("-", 1)[0]: gtid for gtid in (g.strip() for g in state.split(",")) if gtid}
