"""Streaming mode: a table's landed files -> BigQuery's Storage Write API, in seconds and exactly once
(docs/design.md, "Streaming mode" says why it is exactly once).

- The current state is written by BigQuery's native CDC: the table has `PRIMARY KEY (...) NOT ENFORCED`, and every
  change goes to its default stream as a protobuf row with `_CHANGE_TYPE` (UPSERT, or DELETE for Op D) and a
  `_CHANGE_SEQUENCE_NUMBER` that keeps the change sequence's order. Writing a change again is harmless: the
  highest sequence per key wins, an older one is ignored.
- The changelog is appended in Arrow to one COMMITTED stream per table, kept open across loads, at the offset the
  table's state says. The state (`_cdc_loader/<prefix>/state/<dataset>.<table>.json` in the landing bucket) holds
  the stream, its next offset, the highest change sequence appended (the high-water mark) and the last file read.
  Files are read in key order from S3 (never only the ones a message named, so a lost or late message does not
  make a change skipped), their changes sorted by sequence, and only those above the high-water mark are
  appended, current state first, changelog second. An append can only succeed at the stream's true end: a state
  that lags (a crash after an append, before the state was written) meets ALREADY_EXISTS, and is rebuilt from
  BigQuery (the old stream finalized, the high-water mark read from the changelog, a new stream) before anything
  more is appended.
- Every file read is recorded in the ledger table (default stream), as in batch mode.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from google.api_core import exceptions
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import types

from cdc.landing import TRUNCATE_OP, ControlDocuments, load_file_number, table_prefix
from cdc.mappings import TableMapping
from cdc_assets.landed_files import read_landed, truncated_at
from cdc_assets.proto_rows import ProtoRows
from cdc_assets.targets import (
    CHANGE_SEQ,
    COMMIT_TS,
    LEDGER_FIELDS,
    LOADED_AT,
    METADATA_COLUMNS,
    OP,
    Q_CHANGE_SEQ,
    Q_SOURCE_FILE,
    SNAPSHOT_MARKER,
    SOURCE_FILE,
    TRUNCATE_MARKER,
    LoadError,
    TableTargets,
    quote_column,
)

REQUEST_BYTES = (
    8 * 1024 * 1024
)  # per AppendRows request (BigQuery takes up to 20 MB; smaller ones flow sooner)
CHANGE_TYPES = {"I": "UPSERT", "U": "UPSERT", "D": "DELETE"}
LOAD_FILE = re.compile(r"/LOAD[0-9A-F]{8}\.parquet$")
STATE_ROOT = "_cdc_loader"
RECENT_FILES = 256  # CDC files a table's state remembers as read (StreamState.recent)
# where a load's time goes (StreamResult.phases_s): its state read and written (S3), listing its new files, reading
# them, ensuring its tables, and its three appends (AppendRows calls, connection to last response)
LOAD_PHASES = ("state", "list", "read", "tables", "current_state", "changelog", "ledger")


class StreamConflict(RuntimeError):
    """The committed stream is not where the state says (ALREADY_EXISTS, OUT_OF_RANGE, gone or finalized)."""


@dataclass
class StreamState:
    """Where a table's changelog stream is; a cache of what BigQuery holds, rebuilt from it when it lags."""

    stream: str = ""
    offset: int = 0  # the stream's next offset
    hwm: str = ""  # the highest change sequence appended to the changelog ('' = none)
    cursor: str = ""  # the last CDC file read (keys sort by write time)
    loads: dict[str, str] = field(default_factory=dict)  # full-load file -> ETag read
    columns: list[str] = field(default_factory=list)  # the changelog's columns when the stream was opened
    # the CDC files of the last loads, in the ledger already: a message naming one of them again (the run after the
    # one that listed and read it) is answered without asking the ledger
    recent: list[str] = field(default_factory=list)
    # the three tables' schemas as the last load ensured them, and for which batch columns (ensure_tables)
    tables_for: str = ""
    schemas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    day: str = ""  # usage today (UTC), for the quota report
    calls: int = 0
    bytes: int = 0
    streams_created: int = 0

    @classmethod
    def from_json(cls, document: dict[str, Any] | None) -> StreamState | None:
        if not document:
            return None
        known = {name: document[name] for name in cls.__dataclass_fields__ if name in document}
        return cls(**known)

    def count(self, calls: int, size: int, streams: int = 0) -> None:
        today = dt.datetime.now(dt.UTC).date().isoformat()
        if self.day != today:
            self.day, self.calls, self.bytes, self.streams_created = today, 0, 0, 0
        self.calls += calls
        self.bytes += size
        self.streams_created += streams


@dataclass(frozen=True)
class StreamResult:
    table: str
    files: int
    rows: int
    rows_by_op: dict[str, int]
    inserted_changes: int  # changes appended to the changelog (above the high-water mark)
    write_calls: int
    write_bytes: int
    resynced: bool = False
    append_s: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)  # today's Write API calls, bytes, streams created
    commit_times: list[Any] = field(default_factory=list)
    phases_s: dict[str, float] = field(default_factory=dict)  # where the load's time went (LOAD_PHASES)
    read: list[str] = field(default_factory=list)  # the files read (in the ledger and the state now)

    def then(self, later: StreamResult) -> StreamResult:
        """This result and a later one of the same run, as one."""
        ops = {
            op: self.rows_by_op.get(op, 0) + later.rows_by_op.get(op, 0)
            for op in {*self.rows_by_op, *later.rows_by_op}
        }
        return replace(
            later,
            files=self.files + later.files,
            rows=self.rows + later.rows,
            rows_by_op=ops,
            inserted_changes=self.inserted_changes + later.inserted_changes,
            resynced=self.resynced or later.resynced,
            append_s=self.append_s + later.append_s,
            commit_times=self.commit_times + later.commit_times,
            phases_s=later.phases_s,  # the loader's running totals: the later result's include the earlier's
            read=self.read + later.read,
        )


class StreamLoader(TableTargets):
    """Loads one mapped table's landed files through the Storage Write API."""

    def __init__(
        self,
        bq: bigquery.Client,
        write_client: Any,
        mapping: TableMapping,
        control: ControlDocuments,
        max_staleness_minutes: float = 0.0,
        states: dict[str, StreamState] | None = None,
    ):
        super().__init__(bq, mapping)
        # the states a long-lived caller (a stream run, the only writer of its tables) keeps between loads: the
        # state document is then read from S3 only for the first load (the caller drops an entry whenever another
        # run may write the table, or a load of it failed)
        self.states = states
        self.write = write_client
        self.control = control
        self.max_staleness_minutes = max_staleness_minutes
        self.state_name = f"{self.dataset}.{self.current}"
        self.tables_for = ""  # the batch columns the tables were last ensured for (ensure_tables)
        self.from_state = False  # whether their schemas came from the state, not from BigQuery
        self.calls = 0
        self.bytes = 0
        self.phases: dict[str, float] = defaultdict(
            float
        )  # seconds per LOAD_PHASES name, this loader's loads

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases[phase] += time.monotonic() - started

    def phases_s(self) -> dict[str, float]:
        return {name: round(self.phases[name], 3) for name in LOAD_PHASES if name in self.phases}

    # -- the table's state -------------------------------------------------------------------------------------

    def read_state(self) -> StreamState | None:
        with self._timed("state"):
            if self.states is not None and self.state_name in self.states:
                return copy.deepcopy(self.states[self.state_name])  # the load changes its copy
            return StreamState.from_json(self.control.read("state", self.state_name))

    def write_state(self, state: StreamState) -> None:
        with self._timed("state"):
            self.control.write(
                "state", self.state_name, {**state.__dict__, "updated_at": dt.datetime.now(dt.UTC)}
            )
            if self.states is not None:
                self.states[self.state_name] = copy.deepcopy(state)

    # -- which files ---------------------------------------------------------------------------------------------

    def new_files(self, s3: Any, bucket: str, prefix: str, state: StreamState | None) -> list[str]:
        """Files not read yet, in key order: CDC files after the cursor, full-load files with a new ETag."""
        base = table_prefix(prefix, self.mapping.source_schema, self.mapping.source_table)
        options = {"Bucket": bucket, "Prefix": base}
        if state and state.cursor:
            options["StartAfter"] = state.cursor
        found = []
        for page in s3.get_paginator("list_objects_v2").paginate(**options):
            for item in page.get("Contents", []):
                key = item["Key"]
                if load_file_number(key.rsplit("/", 1)[-1]) is not None:
                    if state is None or state.loads.get(key) != str(item.get("ETag", "")).strip('"'):
                        found.append(key)
                elif key.endswith(".parquet"):
                    found.append(key)
        return sorted(found, key=lambda k: (load_file_number(k.rsplit("/", 1)[-1]) is None, k))

    # -- tables --------------------------------------------------------------------------------------------------

    def ensure_tables(self, data: pa.Table, state: StreamState | None = None) -> list[bigquery.SchemaField]:
        """Create or widen the changelog, the current state (primary key, clustering, max_staleness) and the ledger
        for the batch's columns; the changelog's schema. When `state` says the last load ensured them for the same
        columns, their schemas come from it and BigQuery is not asked (`from_state`; a table dropped since makes
        the load ensure them again: `_load`)."""
        fields = _schema_of(data)
        meta = {f.name: f for f in fields}
        data_fields = [f for f in fields if f.name not in METADATA_COLUMNS]
        changelog = [meta[c] for c in (OP, COMMIT_TS, CHANGE_SEQ, SOURCE_FILE, LOADED_AT)] + data_fields
        key = list(self.mapping.primary_key)
        staleness = staleness_interval(self.max_staleness_minutes) if self.max_staleness_minutes > 0 else ""
        self.tables_for = json.dumps(
            [[f.to_api_repr() for f in changelog], key, staleness, self.dataset], sort_keys=True
        )
        names = self._table_names()
        if state and state.tables_for == self.tables_for and all(n in state.schemas for n in names):
            for name in names:
                self.schemas[name] = [bigquery.SchemaField.from_api_repr(f) for f in state.schemas[name]]
            self.from_state = True
            return self.schemas[self.changelog]
        self.from_state = False
        schema = self.ensure(self.changelog, changelog, partition=COMMIT_TS, cluster=key[:4])
        if key:
            current = [*data_fields, meta[COMMIT_TS], meta[CHANGE_SEQ]]
            self.ensure(self.current, current, cluster=key[:4], primary_key=key, max_staleness=staleness)
        self.ensure(self.ledger, LEDGER_FIELDS)
        return schema

    def _table_names(self) -> list[str]:
        """The tables a load writes: changelog, ledger, and the current state of a table with a primary key."""
        return [self.changelog, self.ledger] + ([self.current] if self.mapping.primary_key else [])

    def _remember_tables(self, state: StreamState) -> None:
        """The schemas this load ensured (or took from the state), for the next load's `ensure_tables`."""
        state.tables_for = self.tables_for
        state.schemas = {n: [f.to_api_repr() for f in self.schemas[n]] for n in self._table_names()}

    def type_change_remedy(self) -> str:
        return (
            super().type_change_remedy()
            + "; in streaming mode the current state takes no DML, so the table is rebuilt, not altered"
        )

    # -- loading -------------------------------------------------------------------------------------------------

    def load(
        self,
        s3: Any,
        bucket: str,
        prefix: str,
        named: Sequence[str] = (),
        sizes: list[int] | None = None,
        unreadable: dict[str, str] | None = None,
    ) -> StreamResult:
        """Load every file of the table not read yet (and the files a message `named`, when they are older than the
        cursor and missing from the ledger: a late file). Exactly once; see the module's docstring."""
        state = self.read_state()
        with self._timed("list"):
            keys = self.new_files(s3, bucket, prefix, state)
        late = self._late_files(named, state, keys)
        return self._load(s3, bucket, keys + late, state, set(late), sizes, unreadable)

    def rebuild(
        self,
        s3: Any,
        bucket: str,
        keys: list[str],
        sizes: list[int] | None = None,
        unreadable: dict[str, str] | None = None,
        on_file: Callable[[int], None] | None = None,
    ) -> StreamResult:
        """A backfill: `keys` (a day's files) read again; the changes the changelog lacks are appended, and every
        change goes to the current state again (a change it holds, or an older one, changes nothing there)."""
        return self._load(
            s3, bucket, keys, self.read_state(), set(keys), sizes, unreadable, resend=True, on_file=on_file
        )

    def snapshot(self, s3: Any, bucket: str, keys: list[str], horizon: str) -> StreamResult:
        """A re-snapshot's files (a new full load, its rows at sequences from `horizon` on): its rows appended to
        the changelog once (a load run may have read these files first), the current state set from it - keys the snapshot does
        not have are deleted at the horizon, so a row deleted at the source whose delete never arrived disappears,
        and a change older than the snapshot can no longer change the current state - and the horizon recorded."""
        return self._load(s3, bucket, keys, self.read_state(), set(), None, None, horizon=horizon)

    def _load(
        self,
        s3: Any,
        bucket: str,
        keys: list[str],
        state: StreamState | None,
        late: set[str],
        sizes: list[int] | None,
        unreadable: dict[str, str] | None,
        resend: bool = False,
        horizon: str | None = None,
        on_file: Callable[[int], None] | None = None,
    ) -> StreamResult:
        result = StreamResult(f"{self.dataset}.{self.current}", 0, 0, {}, 0, 0, 0)
        if not keys:
            return result
        versions: dict[str, str] = {}
        rest: list[str] = []
        with self._timed("read"):
            data = read_landed(s3, bucket, keys, sizes, unreadable, on_file, versions, rest)
        keys = [k for k in keys if k not in (unreadable or {}) and k not in rest]
        if (
            rest
        ):  # a type change between the batch's files: those before it first, then the rest (it names it)
            first = self._load(s3, bucket, keys, state, late, None, None, resend, horizon)
            then = self._load(s3, bucket, rest, self.read_state(), late, None, None, resend, horizon)
            return first.then(then)
        if data is None:
            return replace(result, files=len(keys))
        try:
            with self._timed("tables"):
                schema = self.ensure_tables(data, state)
        except LoadError as exc:
            if horizon is None and self._superseded(data):
                # files from before a type change whose remedy (tables dropped, re-snapshot) has run since: the
                # snapshot holds their effect and the dropped changelog their history - recorded, not loaded
                self._record_files(data, keys)
                return replace(result, files=len(keys))
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise LoadError(f"{exc}. Files of this batch: {shown}") from exc
        started = time.monotonic()
        truncate = truncated_at(data) if self.mapping.primary_key and not horizon else None
        if truncate and self.horizon() >= truncate:
            truncate = None  # applied by an earlier attempt (its marker is in the ledger)
        try:
            state, appended, resynced = self._write(
                data, keys, state, schema, late, resend, horizon, truncate
            )
        except exceptions.NotFound:
            if not self.from_state:
                raise
            # a table dropped since the state was written (the type-change remedy): ensured again, then written
            # again - the current state takes a change twice harmlessly, the changelog's offsets and high-water mark
            # keep it once, and the ledger is only written after both
            schema = self.ensure_tables(data)
            state, appended, resynced = self._write(
                data, keys, state, schema, late, resend, horizon, truncate
            )
        read = [k for k in keys if not LOAD_FILE.search(k)]
        state.cursor = max([state.cursor, *read])
        state.recent = sorted(set(state.recent) | set(read))[-RECENT_FILES:]
        state.loads.update({k: versions[k] for k in keys if LOAD_FILE.search(k) and k in versions})
        state.count(self.calls, self.bytes)
        self._remember_tables(state)
        self.write_state(state)
        ops = {item["values"]: item["counts"] for item in pc.value_counts(data[OP]).to_pylist()}
        return StreamResult(
            table=result.table,
            files=len(keys),
            rows=data.num_rows,
            rows_by_op=ops,
            inserted_changes=appended,
            write_calls=self.calls,
            write_bytes=self.bytes,
            resynced=resynced,
            append_s=round(time.monotonic() - started, 3),
            usage={
                "day": state.day,
                "calls": state.calls,
                "bytes": state.bytes,
                "streams": state.streams_created,
            },
            commit_times=pc.unique(data[COMMIT_TS]).to_pylist(),
            phases_s=self.phases_s(),
            read=keys,
        )

    def _write(
        self,
        data: pa.Table,
        keys: list[str],
        state: StreamState | None,
        schema: list[bigquery.SchemaField],
        late: set[str],
        resend: bool,
        horizon: str | None,
        truncate: str | None,
    ) -> tuple[StreamState, int, bool]:
        """The batch's changes appended (`_append`), then its files recorded in the ledger."""
        state, appended, resynced = self._append(data, state, schema, late, resend, horizon, truncate)
        if truncate:
            self._record_files(data, keys, truncate, TRUNCATE_MARKER)
        else:
            self._record_files(data, keys, horizon)
        return state, appended, resynced

    def _late_files(self, named: Sequence[str], state: StreamState | None, listed: list[str]) -> list[str]:
        """Files a message named that sort before the cursor and are not in the ledger: written late (a producer
        that named a file earlier than the last one read). Their changes below the high-water mark are checked
        against the changelog one by one (rare: a query). A file among the state's recent files is in the ledger
        (the state is written after it): the usual case - the run before listed and read the files this run's
        messages name - asks BigQuery nothing."""
        cursor = state.cursor if state else ""
        recent = set(state.recent) if state else set()
        older = [
            k
            for k in named
            if k not in listed and k not in recent and not LOAD_FILE.search(k) and k <= cursor
        ]
        if not older:
            return []
        return sorted(set(older) - self.loaded_files(older))

    def _append(
        self,
        data: pa.Table,
        state: StreamState | None,
        schema: list[bigquery.SchemaField],
        late: set[str],
        resend: bool = False,
        horizon: str | None = None,
        truncate: str | None = None,
    ) -> tuple[StreamState, int, bool]:
        """Append the batch's new changes, the current state first, then the changelog; (state, appended,
        resynced). `resend`: every change of the batch goes to the current state, not only the new ones;
        `horizon`: the batch is a snapshot (its rows the changelog lacks are appended; keys it lacks are deleted
        from the current state at the horizon); `truncate`: the sequence of a TRUNCATE in the batch - every key of
        the current state is deleted at it (a key changed after it keeps that change: a higher sequence wins)."""
        resynced = False
        columns = [f.name for f in schema]
        if state is None or not state.stream or state.columns != columns:
            state, resynced = self._resync(state, columns), True
        for attempt in range(2):
            changes = self._snapshot_changes(data) if horizon else self._new_changes(data, state, late)
            if self.mapping.primary_key and horizon:  # the whole snapshot, whatever the changelog holds of it
                snapshot = self._sorted(data)
                self._write_current_state(
                    snapshot, deletes=self._keys_missing_from(snapshot), horizon=horizon
                )
            elif self.mapping.primary_key and (changes.num_rows or resend):
                self._write_current_state(self._sorted(data) if resend else changes)
            if truncate:
                key = list(self.mapping.primary_key)
                self._write_current_state(
                    data.slice(0, 0), deletes=self._keys_held(data, key), horizon=truncate
                )
            if changes.num_rows == 0:
                return state, 0, resynced
            try:
                self._write_changelog(changes, state)
            except StreamConflict:
                if attempt:
                    raise
                state, resynced = self._resync(state, columns), True
                continue
            state.offset += changes.num_rows
            if not horizon:  # a snapshot's rows may sort below changes already appended
                state.hwm = max(state.hwm, str(changes[CHANGE_SEQ][-1]))
            return state, changes.num_rows, resynced
        raise AssertionError("unreachable")

    @staticmethod
    def _sorted(data: pa.Table) -> pa.Table:
        return data.take(
            pc.sort_indices(data, sort_keys=[(CHANGE_SEQ, "ascending"), (SOURCE_FILE, "ascending")])
        )

    def _superseded(self, data: pa.Table) -> bool:
        """Whether every change of `data` precedes the table's latest re-snapshot."""
        horizon = self.horizon()
        return bool(horizon) and str(pc.max(data[CHANGE_SEQ]).as_py()) < horizon

    def _snapshot_changes(self, data: pa.Table) -> pa.Table:
        """A snapshot's rows the changelog lacks, in sequence order. Its files are full-load files with a new ETag,
        so a load run may have appended them already (or an earlier attempt a part of them), and another snapshot
        at the same binlog position (the capture's full load after `cdc capture reset`, then `cdc resnapshot`) has
        the same changes under other file names: one query for the identities in the snapshot's sequence range,
        which only snapshot rows at that position carry."""
        data = self._sorted(data)
        if data.num_rows == 0:
            return data
        sql = (
            f"SELECT {Q_CHANGE_SEQ} AS seq, `{OP}` AS op FROM {self.ref(self.changelog)} "
            f"WHERE {Q_CHANGE_SEQ} BETWEEN @first AND @last"
        )
        sequences = data[CHANGE_SEQ]
        config = bigquery.QueryJobConfig(
            query_parameters=[
                bigquery.ScalarQueryParameter("first", "STRING", str(sequences[0])),
                bigquery.ScalarQueryParameter("last", "STRING", str(sequences[-1])),
            ]
        )
        present = {(row.seq, row.op) for row in self.bq.query(sql, job_config=config).result()}
        if not present:
            return data
        identities = zip(sequences.to_pylist(), data[OP].to_pylist(), strict=True)
        keep = [index for index, identity in enumerate(identities) if identity not in present]
        return data.take(pa.array(keep, pa.int64()))

    def _keys_held(self, data: pa.Table, key: list[str], unless_in: pa.Table | None = None) -> pa.Table:
        """Every key of the current state now (those `unless_in` holds left out), typed as in `data`."""
        quoted = ", ".join(quote_column(k) for k in key)
        present = self.bq.query(f"SELECT {quoted} FROM {self.ref(self.current)}").result()
        held = (
            set(zip(*(unless_in[k].to_pylist() for k in key), strict=True))
            if unless_in is not None
            else set()
        )
        rows = [r for r in (tuple(row.values()) for row in present) if r not in held]
        return pa.table(
            {k: pa.array([r[i] for r in rows], data.schema.field(k).type) for i, k in enumerate(key)}
        )

    def _keys_missing_from(self, snapshot: pa.Table) -> pa.Table:
        """The current state's keys the snapshot does not hold (deleted at the source meanwhile)."""
        return self._keys_held(snapshot, list(self.mapping.primary_key), unless_in=snapshot)

    def _new_changes(self, data: pa.Table, state: StreamState, late: set[str]) -> pa.Table:
        """The batch's changes to append, each once, in sequence order: those above the high-water mark, and those
        of late files below it that the changelog lacks (asked by one query)."""
        data = self._sorted(data)
        identities = list(zip(data[CHANGE_SEQ].to_pylist(), data[OP].to_pylist(), strict=True))
        files = data[SOURCE_FILE].to_pylist()
        candidates = {i for i, f in zip(identities, files, strict=True) if i[0] <= state.hwm and f in late}
        missing = candidates - self._present(candidates) if candidates else set()
        seen: set[tuple[str, str]] = set()
        keep = []
        for index, identity in enumerate(identities):
            if identity in seen or (identity[0] <= state.hwm and identity not in missing):
                continue
            seen.add(identity)
            keep.append(index)
        return data.take(pa.array(keep, pa.int64()))

    def _present(self, identities: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (sequence, Op) the changelog holds (asked only for a late file's changes)."""
        sql = (
            f"SELECT {Q_CHANGE_SEQ} AS seq, `{OP}` AS op FROM {self.ref(self.changelog)} "
            f"WHERE {Q_CHANGE_SEQ} IN UNNEST(@seqs)"
        )
        config = bigquery.QueryJobConfig(
            query_parameters=[
                bigquery.ArrayQueryParameter("seqs", "STRING", sorted({s for s, _ in identities}))
            ]
        )
        return {(row.seq, row.op) for row in self.bq.query(sql, job_config=config).result()}

    def _write_current_state(
        self, changes: pa.Table, deletes: pa.Table | None = None, horizon: str | None = None
    ) -> None:
        """UPSERT/DELETE per change on the current state's default stream (protobuf: native CDC takes no Arrow);
        with `deletes`, those keys are deleted at the `horizon` sequence."""
        changes = changes.filter(pc.not_equal(changes[OP], TRUNCATE_OP))  # applied as the deletes it implies
        schema = self.schemas.get(self.current) or self.bq.get_table(self.table_id(self.current)).schema
        rows = ProtoRows(schema)
        columns = {f.name for f in schema}
        payload = rows.encode(
            changes.select([c for c in changes.column_names if c in columns]),
            [CHANGE_TYPES[op] for op in changes[OP].to_pylist()],
            changes[CHANGE_SEQ].to_pylist(),
        )
        if deletes is not None and deletes.num_rows and horizon:
            payload += rows.encode(deletes, ["DELETE"] * deletes.num_rows, [horizon] * deletes.num_rows)
        if not payload:
            return
        stream = f"projects/{self.project}/datasets/{self.dataset}/tables/{self.current}/streams/_default"
        requests: list[types.AppendRowsRequest] = []
        for chunk in _chunks(payload):
            request = types.AppendRowsRequest(write_stream=stream if not requests else "")
            proto = types.AppendRowsRequest.ProtoData(rows=types.ProtoRows(serialized_rows=chunk))
            if not requests:
                proto.writer_schema = types.ProtoSchema(proto_descriptor=rows.descriptor)
            request.proto_rows = proto
            requests.append(request)
        self._send(requests, sum(len(r) for r in payload), "current_state")

    def _write_changelog(self, changes: pa.Table, state: StreamState) -> None:
        """The changes, in Arrow, on the committed stream at the state's offset (several requests: each its own)."""
        target_columns = state.columns
        table = changes.select([c for c in target_columns if c in changes.column_names])
        requests: list[types.AppendRowsRequest] = []
        offset = state.offset
        for batch in table.to_batches(max_chunksize=_rows_per_request(table)):
            request = types.AppendRowsRequest(
                write_stream=state.stream if not requests else "", offset=offset
            )
            arrow = types.AppendRowsRequest.ArrowData(
                rows=types.ArrowRecordBatch(serialized_record_batch=batch.serialize().to_pybytes())
            )
            if not requests:
                arrow.writer_schema = types.ArrowSchema(
                    serialized_schema=table.schema.serialize().to_pybytes()
                )
            request.arrow_rows = arrow
            requests.append(request)
            offset += batch.num_rows
        try:
            self._send(requests, table.nbytes, "changelog")
        except (
            exceptions.AlreadyExists,
            exceptions.OutOfRange,
            exceptions.NotFound,
            exceptions.FailedPrecondition,
        ) as exc:
            raise StreamConflict(str(exc)) from exc

    def _record_files(
        self, data: pa.Table, keys: list[str], horizon: str | None = None, marker: str = SNAPSHOT_MARKER
    ) -> None:
        """Every file read, in the ledger (its rows and the time), on the ledger's default stream; a snapshot's
        (or a TRUNCATE's) horizon as its marker row."""
        counts = {item["values"]: item["counts"] for item in pc.value_counts(data[SOURCE_FILE]).to_pylist()}
        now = dt.datetime.now(dt.UTC)
        files = keys + ([f"{marker}{horizon}"] if horizon else [])
        ledger = pa.table(
            {
                "source_file": pa.array(files, pa.string()),
                "row_count": pa.array(
                    [counts.get(k, 0) for k in keys] + ([data.num_rows] if horizon else []), pa.int64()
                ),
                "batch": pa.array(["stream"] * len(files), pa.string()),
                "load_jobs": pa.array([0] * len(files), pa.int64()),
                "loaded_at": pa.array([now] * len(files), pa.timestamp("us", tz="UTC")),
                "snapshot_horizon": pa.array(
                    [None] * len(keys) + ([horizon] if horizon else []), pa.string()
                ),
            }
        )
        stream = f"projects/{self.project}/datasets/{self.dataset}/tables/{self.ledger}/streams/_default"
        request = types.AppendRowsRequest(write_stream=stream)
        request.arrow_rows = types.AppendRowsRequest.ArrowData(
            writer_schema=types.ArrowSchema(serialized_schema=ledger.schema.serialize().to_pybytes()),
            rows=types.ArrowRecordBatch(
                serialized_record_batch=ledger.to_batches()[0].serialize().to_pybytes()
            ),
        )
        self._send([request], ledger.nbytes, "ledger")

    def _send(self, requests: list[Any], size: int, phase: str) -> None:
        """One AppendRows connection for the requests, every response read; the first error raised. Each request
        is answered once: fewer answers mean requests that were never sent. (The client retries a connection that
        met UNAVAILABLE with the same request iterator, which the failed attempt may have used up: the retry then
        sends nothing, or only the rest, and ends without an error. Counted, that fails the load instead of
        losing its rows; the load is done again, which writes nothing twice.)"""
        self.calls += len(requests)
        self.bytes += size
        answered = 0
        with self._timed(phase):
            for response in self.write.append_rows(iter(requests)):
                answered += 1
                if response.error.code:
                    raise exceptions.from_grpc_status(response.error.code, response.error.message)
        if answered < len(requests):
            raise exceptions.ServiceUnavailable(
                f"{self.dataset}: AppendRows answered {answered} of {len(requests)} request(s) for the {phase} "
                "(a connection retried after UNAVAILABLE sends only what its first attempt left); the load is "
                "done again"
            )

    # -- resync: the state rebuilt from BigQuery -----------------------------------------------------------------

    def _resync(self, state: StreamState | None, columns: list[str]) -> StreamState:
        """Finalize the stream the state names (nothing more can land on it), read the high-water mark and the last
        CDC file from the changelog, and open a new committed stream."""
        if state and state.stream:
            try:
                self.write.finalize_write_stream(name=state.stream)
            except (exceptions.NotFound, exceptions.FailedPrecondition, exceptions.InvalidArgument):
                pass  # gone (expired, or the server restarted) or already finalized: nothing can land on it
        hwm, cursor = self._changelog_position()
        cursor = max(
            cursor, state.cursor if state else ""
        )  # a changelog rebuilt (dropped) starts after the cursor
        stream = self.write.create_write_stream(
            parent=f"projects/{self.project}/datasets/{self.dataset}/tables/{self.changelog}",
            write_stream=types.WriteStream(type_=types.WriteStream.Type.COMMITTED),
        )
        fresh = StreamState(stream=stream.name, offset=0, hwm=hwm, cursor=cursor, columns=columns)
        if state:
            # full-load files are read again, their changes below the high-water mark skipped - unless the changelog
            # is empty because it was dropped (a type-change remedy): then they stay read
            fresh.loads = dict(state.loads) if not hwm else {}
            fresh.day, fresh.calls, fresh.bytes = state.day, state.calls, state.bytes
            fresh.streams_created = state.streams_created
        fresh.count(0, 0, streams=1)
        return fresh

    def _changelog_position(self) -> tuple[str, str]:
        """(the highest change sequence in the changelog, the last CDC file it came from) - '' when empty."""
        sql = (
            f"SELECT MAX({Q_CHANGE_SEQ}) AS hwm, MAX(IF(REGEXP_CONTAINS({Q_SOURCE_FILE}, r'/LOAD[0-9A-F]{{8}}"
            rf"\.parquet$'), NULL, {Q_SOURCE_FILE})) AS cursor FROM {self.ref(self.changelog)}"
        )
        row = next(iter(self.bq.query(sql).result()))
        return row.hwm or "", row.cursor or ""


def staleness_interval(minutes: float) -> str:
    """BigQuery's INTERVAL text of `max_staleness` ('Y-M D H:M:S')."""
    seconds = round(minutes * 60)
    days, rest = divmod(seconds, 86400)
    return f"0-0 {days} {rest // 3600}:{rest % 3600 // 60}:{rest % 60}"


def _schema_of(data: pa.Table) -> list[bigquery.SchemaField]:
    """The BigQuery schema a batch's Arrow columns load as (the types batch mode's Parquet loads give)."""
    return [bigquery.SchemaField(f.name, _bigquery_type(f.type), mode="NULLABLE") for f in data.schema]


def _bigquery_type(kind: pa.DataType) -> str:
    if pa.types.is_integer(kind):
        return "INTEGER"
    if pa.types.is_floating(kind):
        return "FLOAT"
    if pa.types.is_boolean(kind):
        return "BOOLEAN"
    if pa.types.is_decimal(kind):
        return "NUMERIC" if kind.precision <= 38 and kind.scale <= 9 else "BIGNUMERIC"
    if pa.types.is_timestamp(kind):
        return "TIMESTAMP" if kind.tz else "DATETIME"
    if pa.types.is_date(kind):
        return "DATE"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "BYTES"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "STRING"
    raise LoadError(f"Arrow type {kind} has no BigQuery column type here")


def _chunks(rows: list[bytes]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    for row in rows:
        if chunk and size + len(row) > REQUEST_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += len(row) + 8
    if chunk:
        yield chunk


def _rows_per_request(table: pa.Table) -> int:
    per_row = max(1, table.nbytes // max(table.num_rows, 1))
    return max(1, REQUEST_BYTES // per_row)
