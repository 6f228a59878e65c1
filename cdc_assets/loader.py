"""The BigQuery side of one mapped table: landed Parquet files -> changelog + exact current state, exactly once.

For a batch of landed files (full-load or CDC, from our capture or DMS):
1. the files are read from S3 and unified (a column added at the source is null in older files), and converted
   to types BigQuery loads exactly (uint64 -> NUMERIC, decimal > 38 digits -> BIGNUMERIC, ints -> INT64);
2. they are loaded into a staging table named after the file set, under a job id derived from the file set plus
   an attempt number. On 409 the existing job decides: done without error = already loaded; failed = the next
   attempt id (a failed job's id can never be reused);
3. one transaction MERGEs the staged changes into the changelog, inserting only changes it does not have
   (identity: change sequence + Op), so any redelivery or regrouping of files adds nothing twice; then sets the
   current state of the batch's keys to the latest change per key in the whole changelog, ordered by change
   sequence: deletes delete, a key change moves the row, a late older change cannot regress it.

A rebuild (a partition backfill) MERGEs every landed file of the day instead: changes the changelog lacks are
inserted, changes it holds are reset to the files' values, changes credited to those files but no longer in them
are removed, and the whole current state is re-derived from the changelog (rows deleted or altered behind the
pipeline's back come back). Running it twice changes nothing the second time.

Tables: current state at the mapped `dataset.table`, changelog beside it as `dataset.table_changelog`
(partitioned by commit day, clustered by the primary key), and the ledger of loaded files
`dataset.table_loaded_files` (file, batch, rows, load jobs, time), written in the same transaction as the data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from google.api_core import exceptions
from google.cloud import bigquery

from capture import layout
from cdc.mappings import TableMapping, quote_bigquery

OP, COMMIT_TS, CHANGE_SEQ, SOURCE_FILE, LOADED_AT = (
    "_op",
    "_commit_ts",
    "_change_seq",
    "_source_file",
    "_loaded_at",
)
MAX_ATTEMPTS = 3  # tries per load call
MAX_JOB_IDS = 1000  # attempt ids per job family, over every retry of the batch


class LoadError(RuntimeError):
    """A batch that cannot be loaded; the message names the table, the file or job, and what to do."""


LEDGER_SUFFIX = "_loaded_files"


@dataclass(frozen=True)
class LoadResult:
    table: str
    files: int
    rows: int
    rows_by_op: dict[str, int]
    inserted_changes: int
    jobs: int
    load_jobs: int = 0
    skipped: bool = False  # this exact file set had been merged before
    batch_changes: int = 0  # changelog rows holding one of the batch's changes, after the merge
    duplicated_changes: int = 0  # ... of which repeat a change (sequence + Op) already there: must be 0
    load_jobs_today: int = 0  # load jobs this table's batches used today (UTC), this one included
    stage_s: float = 0.0  # seconds of the staging load job
    merge_s: float = 0.0  # seconds of the merge transaction


def bigquery_type(arrow_type: pa.DataType) -> pa.DataType:
    """The Arrow type a column is loaded as, so that BigQuery holds the source value exactly."""
    if pa.types.is_uint64(arrow_type):
        return pa.decimal128(20, 0)  # NUMERIC: BIGINT UNSIGNED does not fit INT64
    if pa.types.is_integer(arrow_type):
        return pa.int64()
    if pa.types.is_floating(arrow_type):
        return pa.float64()
    if pa.types.is_decimal(arrow_type):
        precision, scale = arrow_type.precision, arrow_type.scale
        if precision - scale <= 29 and scale <= 9:
            return pa.decimal128(38, 9)  # NUMERIC
        return pa.decimal256(76, 38)  # BIGNUMERIC
    return arrow_type


def read_landed(
    s3: Any,
    bucket: str,
    keys: list[str],
    sizes: list[int] | None = None,
    unreadable: dict[str, str] | None = None,
    on_file: Callable[[int], None] | None = None,
    versions: dict[str, str] | None = None,
) -> pa.Table | None:
    """Every row of the files, with the changelog's metadata columns, in BigQuery-loadable types (None: no
    readable file). File sizes in bytes are appended to `sizes` when given. A file that is not a readable DMS
    Parquet file raises LoadError, or, with `unreadable` given, is recorded there (key -> reason) and skipped.
    `on_file` is called with each readable file's row count (progress of a backfill). `versions` receives each
    file's ETag (its content identity: a key written again with other rows is another batch)."""
    parts = []
    for key in keys:
        response = s3.get_object(Bucket=bucket, Key=key)
        body = response["Body"].read()
        if versions is not None:
            versions[key] = str(response.get("ETag", "")).strip('"')
        if sizes is not None:
            sizes.append(len(body))
        try:
            try:
                table = pq.read_table(io.BytesIO(body))
            except Exception as exc:
                raise LoadError(
                    f"s3://{bucket}/{key}: not a readable Parquet file ({exc}); it is left unloaded"
                ) from exc
            parts.append(_with_metadata(table, key))
            if on_file is not None:
                on_file(table.num_rows)
        except LoadError as exc:
            if unreadable is None:
                raise
            unreadable[key] = str(exc)
    if not parts:
        return None
    return pa.concat_tables(parts, promote_options="permissive")


def _with_metadata(table: pa.Table, key: str) -> pa.Table:
    names = table.column_names
    op = (
        table[layout.OP_COLUMN] if layout.OP_COLUMN in names else pa.array(["I"] * table.num_rows)
    )  # DMS full load
    if layout.COMMIT_TIMESTAMP_COLUMN not in names or layout.CHANGE_SEQUENCE_COLUMN not in names:
        raise LoadError(
            f"{key}: missing {layout.COMMIT_TIMESTAMP_COLUMN} or {layout.CHANGE_SEQUENCE_COLUMN}; render the DMS "
            "task with `cdc dms render` (it adds both)"
        )
    commit = table[layout.COMMIT_TIMESTAMP_COLUMN].cast(
        pa.timestamp("us")
    )  # "yyyy-MM-dd HH:mm:ss.SSSSSS", UTC
    columns = {
        OP: op,
        COMMIT_TS: pc.assume_timezone(commit, "UTC"),
        CHANGE_SEQ: table[layout.CHANGE_SEQUENCE_COLUMN],
        SOURCE_FILE: pa.array([key] * table.num_rows, pa.string()),
        LOADED_AT: pa.array([dt.datetime.now(dt.UTC)] * table.num_rows, pa.timestamp("us", tz="UTC")),
    }
    for name in names:
        if name not in layout.ADDED_COLUMNS:
            column = table[name]
            columns[name] = column.cast(bigquery_type(column.type))
    return pa.table(columns)


def batch_id(keys: list[str], versions: dict[str, str] | None = None) -> str:
    """The batch's identity: its files, and with `versions` their contents (S3 ETags), so that a key written again
    with other rows (a capture reset or a DMS table reload rewrites LOAD00000001.parquet) is a new batch."""
    versions = versions or {}
    return hashlib.sha256(
        "\n".join(f"{key} {versions.get(key, '')}".rstrip() for key in sorted(keys)).encode()
    ).hexdigest()[:20]


class TableLoader:
    def __init__(self, bq: bigquery.Client, mapping: TableMapping):
        self.bq = bq
        self.mapping = mapping
        self.project = bq.project
        self.dataset = mapping.target_dataset
        self.current = mapping.target_table
        # An append-only table's changes are its content: they land at the mapped name, with no separate state.
        self.changelog = mapping.changelog_table if mapping.primary_key else mapping.target_table
        self.ledger = f"{mapping.target_table}{LEDGER_SUFFIX}"
        self.jobs = 0
        self.load_jobs = 0

    def ref(self, table: str) -> str:
        return quote_bigquery(self.project, self.dataset, table)

    def _key(self) -> list[str]:
        if not self.mapping.primary_key:
            raise LoadError(f"{self.mapping.source}: append-only tables have no current state to merge")
        return list(self.mapping.primary_key)

    # -- exactly-once jobs ---------------------------------------------------------------------------------------

    def run_job(self, base_id: str, submit: Callable[[str], Any]) -> Any:
        """Run a job under `base_id_a<n>`; a 409 is answered by the existing job's outcome: done = already run
        (never twice); failed = that id is spent, try the next one. Ids spent by earlier runs (a batch that failed
        before, e.g. while BigQuery was down) do not count against this call's MAX_ATTEMPTS tries."""
        last_error: Exception | None = None
        tries = 0
        for attempt in range(MAX_JOB_IDS):
            if tries >= MAX_ATTEMPTS:
                break
            job_id = f"{base_id}_a{attempt}"
            try:
                self.jobs += 1
                tries += 1
                job = submit(job_id)
                job.result()
                return job
            except exceptions.Conflict:
                tries -= 1  # not a try of ours: the id was taken before
                existing = self.bq.get_job(job_id)
                if existing.state != "DONE":
                    existing.result()
                    return existing
                if existing.error_result is None:
                    return existing  # already done: never twice
                last_error = LoadError(f"job {job_id} failed earlier: {existing.error_result}")
            except exceptions.GoogleAPIError as exc:
                last_error = exc
        raise LoadError(
            f"{self.mapping.source} -> {self.dataset}.{self.current}: {MAX_ATTEMPTS} attempts of {base_id} failed; "
            f"last error: {last_error}"
        )

    # -- tables --------------------------------------------------------------------------------------------------

    def ensure_tables(self, staged: list[bigquery.SchemaField]) -> None:
        """Create or widen the changelog, current-state and ledger tables for the staged columns (the dataset
        exists: the stage table is in it)."""
        data_fields = [f for f in staged if f.name not in (OP, COMMIT_TS, CHANGE_SEQ, SOURCE_FILE, LOADED_AT)]
        meta = {f.name: f for f in staged}
        changelog_fields = [
            meta[OP],
            meta[COMMIT_TS],
            meta[CHANGE_SEQ],
            meta[SOURCE_FILE],
            meta[LOADED_AT],
            *data_fields,
        ]
        current_fields = [*data_fields, meta[COMMIT_TS], meta[CHANGE_SEQ]]
        key = self._key() if self.mapping.primary_key else []
        self._ensure(self.changelog, changelog_fields, partition=COMMIT_TS, cluster=key[:4])
        if key:
            self._ensure(self.current, current_fields, partition=None, cluster=key[:4])
        self._ensure(self.ledger, LEDGER_FIELDS, partition=None, cluster=[])

    def _ensure(
        self, name: str, fields: list[bigquery.SchemaField], partition: str | None, cluster: list[str]
    ) -> None:
        table_id = f"{self.project}.{self.dataset}.{name}"
        try:
            table = self.bq.get_table(table_id)
        except exceptions.NotFound:
            table = bigquery.Table(table_id, schema=fields)
            if partition:
                table.time_partitioning = bigquery.TimePartitioning(
                    type_=bigquery.TimePartitioningType.DAY, field=partition
                )
            if cluster:
                table.clustering_fields = cluster
            self.bq.create_table(table, exists_ok=True)
            return
        have = {f.name: f for f in table.schema}
        for field in fields:
            if field.name in have and _base_type(have[field.name].field_type) != _base_type(field.field_type):
                raise LoadError(
                    f"{self.mapping.source}: incompatible type change - column {field.name} is "
                    f"{have[field.name].field_type} in {self.dataset}.{name} but {field.field_type} in the landed "
                    f"files, and BigQuery cannot change it in place. This table stops loading (its files are "
                    f"retried, then dead-lettered; other tables go on). To resume: {self._type_change_remedy()}"
                )
        added = [
            bigquery.SchemaField(f.name, f.field_type, mode="NULLABLE") for f in fields if f.name not in have
        ]
        if added:
            table.schema = [*table.schema, *added]
            self.bq.update_table(table, ["schema"])

    def _type_change_remedy(self) -> str:
        if self.mapping.primary_key:
            return (
                f"rename or drop {self.dataset}.{self.current} and {self.dataset}.{self.changelog}, then run the "
                f"resnapshot_table job for {self.mapping.target} (it recreates both with the new type)"
            )
        return (
            f"rename or drop {self.dataset}.{self.current}, then redrive the dead-lettered messages or backfill the "
            "days since the change (the table is recreated with the new type)"
        )

    # -- loading -------------------------------------------------------------------------------------------------

    def load(
        self,
        data: pa.Table,
        keys: list[str],
        rebuild_id: str | None = None,
        snapshot_horizon: str | None = None,
        versions: dict[str, str] | None = None,
    ) -> LoadResult:
        """Load a batch of landed files exactly once; with `rebuild_id` (unique per backfill run), rebuild from them.
        `versions` (key -> ETag, from read_landed) makes the batch's identity its files' contents, not only names.

        With `snapshot_horizon` the batch is a complete new full load of the table whose rows carry change
        sequences from that horizon on: the horizon is recorded, every change before it no longer counts for the
        current state (which is re-derived whole), so keys whose deletes were never loaded disappear."""
        if snapshot_horizon is not None and not re.fullmatch(r"[0-9]{1,64}", snapshot_horizon):
            raise LoadError(
                f"{self.mapping.source}: snapshot horizon {snapshot_horizon!r} is not a change sequence"
            )
        batch = batch_id(keys, versions)
        stage = f"_stage_{self.current}_{batch}"
        stage_id = f"{self.project}.{self.dataset}.{stage}"
        self.bq.create_dataset(
            self.dataset, exists_ok=True
        )  # the stage table's home (ensure_tables: the rest)
        buffer = io.BytesIO()
        pq.write_table(data, buffer)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
        )
        base = f"cdc_{self.dataset}_{self.current}_{batch}"
        if rebuild_id:
            base += f"_rebuild_{_job_safe(rebuild_id)}"
        if snapshot_horizon:
            base += f"_snapshot_{snapshot_horizon}"

        def submit_load(job_id: str) -> Any:
            self.load_jobs += 1
            buffer.seek(0)
            return self.bq.load_table_from_file(buffer, stage_id, job_config=config, job_id=job_id)

        ops = {item["values"]: item["counts"] for item in pc.value_counts(data[OP]).to_pylist()}
        result = LoadResult(f"{self.dataset}.{self.current}", len(keys), data.num_rows, ops, 0, 0)
        if self._applied(f"{base}_merge"):
            return replace(result, skipped=True)  # this exact file set was merged before: nothing twice
        stage_started = time.monotonic()
        self.run_job(f"{base}_stage", submit_load)
        stage_s = time.monotonic() - stage_started
        # A failed batch keeps its stage table: the retry finds its load job done and merges without a new one.
        staged = self.bq.get_table(stage_id).schema
        try:
            self.ensure_tables(list(staged))
        except LoadError as exc:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise LoadError(f"{exc}. Files of this batch: {shown}") from exc
        columns = [f.name for f in staged]
        if rebuild_id:
            script = self._rebuild_script(stage, columns)
        else:
            script = self._merge_script(stage, columns, snapshot_horizon)
        ledger = self._ledger_statement(stage, batch)
        if snapshot_horizon:
            ledger += "\n" + self._horizon_statement(batch, snapshot_horizon, data.num_rows)
        script = script.replace("COMMIT TRANSACTION;", ledger + "\nCOMMIT TRANSACTION;")
        script = f"DECLARE changes_before INT64 DEFAULT (SELECT COUNT(*) FROM {self.ref(self.changelog)});\n{script}"
        script += "\n" + self._statistics_query(stage)
        merge_started = time.monotonic()
        job = self.run_job(
            f"{base}_merge", lambda job_id: self.bq.query(script, job_id=job_id, job_retry=None)
        )
        merge_s = time.monotonic() - merge_started
        rows = list(job.result())  # the script's last statement: what the batch did (empty: merged before)
        self.bq.delete_table(stage_id, not_found_ok=True)
        stats = dict(rows[0].items()) if rows else {}
        return replace(
            result,
            inserted_changes=int(stats.get("inserted", 0)),
            batch_changes=int(stats.get("batch_changes", 0)),
            duplicated_changes=int(stats.get("duplicated", 0)),
            load_jobs_today=int(stats.get("load_jobs_today", 0)),
            jobs=self.jobs,
            load_jobs=self.load_jobs,
            stage_s=round(stage_s, 3),
            merge_s=round(merge_s, 3),
        )

    def _statistics_query(self, stage: str) -> str:
        """What the batch did, read back in the same script after its transaction: changes added to the changelog;
        changelog rows holding one of the batch's changes and how many of them repeat one (a change is its sequence
        and Op; the batch's commit-time range prunes the changelog's partitions); load jobs of the table today."""
        q = quote_column
        batch_range = (
            f"c.{q(COMMIT_TS)} BETWEEN (SELECT MIN({q(COMMIT_TS)}) FROM {self.ref(stage)}) "
            f"AND (SELECT MAX({q(COMMIT_TS)}) FROM {self.ref(stage)})"
        )
        in_batch = (
            f"EXISTS (SELECT 1 FROM {self.ref(stage)} AS s WHERE s.{q(CHANGE_SEQ)} = c.{q(CHANGE_SEQ)} "
            f"AND s.{q(OP)} = c.{q(OP)})"
        )
        return (
            f"SELECT (SELECT COUNT(*) FROM {self.ref(self.changelog)}) - changes_before AS inserted, "
            f"COUNT(*) AS batch_changes, "
            f"COUNT(*) - COUNT(DISTINCT CONCAT(c.{q(CHANGE_SEQ)}, c.{q(OP)})) AS duplicated, "
            f"(SELECT COALESCE(SUM(jobs), 0) FROM (SELECT batch, MAX(load_jobs) AS jobs FROM {self.ref(self.ledger)} "
            f"WHERE DATE(loaded_at) = CURRENT_DATE() GROUP BY batch)) AS load_jobs_today "
            f"FROM {self.ref(self.changelog)} AS c WHERE {batch_range} AND {in_batch};"
        )

    def _applied(self, base_id: str) -> bool:
        """Whether a job of this id family finished without error (the batch's commit marker)."""
        for attempt in range(MAX_JOB_IDS):  # ids are used in order: the first unknown one ends the family
            try:
                job = self.bq.get_job(f"{base_id}_a{attempt}")
            except exceptions.NotFound:
                return False
            if job.state == "DONE" and job.error_result is None:
                return True
        return False

    def duplicate_changes(self) -> tuple[int, int]:
        """(changes, duplicated changes) in the changelog; a change is identified by sequence and Op."""
        try:
            self.bq.get_table(f"{self.project}.{self.dataset}.{self.changelog}")
        except exceptions.NotFound:
            return 0, 0
        sql = (
            f"SELECT COUNT(*) AS n, COUNT(*) - COUNT(DISTINCT CONCAT({quote_column(CHANGE_SEQ)}, {quote_column(OP)})) AS d "
            f"FROM {self.ref(self.changelog)}"
        )
        row = next(iter(self.bq.query(sql).result()))
        return int(row.n), int(row.d)

    def _merge_script(
        self, stage: str, staged_columns: list[str], snapshot_horizon: str | None = None
    ) -> str:
        """The batch's transaction. Every identifier is validated and quoted (tables by quote_bigquery)."""
        q = quote_column
        cols = ", ".join(q(c) for c in staged_columns)
        statements = [
            "BEGIN TRANSACTION;",
            f"MERGE {self.ref(self.changelog)} AS c USING ({self._distinct_changes(stage)}) AS s "
            f"ON c.{q(CHANGE_SEQ)} = s.{q(CHANGE_SEQ)} AND c.{q(OP)} = s.{q(OP)} "
            f"WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({', '.join(f's.{q(c)}' for c in staged_columns)});",
        ]
        if self.mapping.primary_key and snapshot_horizon:  # a new full load: the whole state from it on
            statements.append(self._current_state_statement(stage=None, horizon=snapshot_horizon))
        elif self.mapping.primary_key:
            statements.append(self._current_state_statement(stage))
        statements.append("COMMIT TRANSACTION;")
        return "\n".join(statements)

    def _distinct_changes(self, stage: str) -> str:
        """The staged changes, each once: two files of one batch may carry the same change (a capture replay)."""
        q = quote_column
        return (
            f"SELECT * FROM {self.ref(stage)} "
            f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {q(CHANGE_SEQ)}, {q(OP)} ORDER BY {q(SOURCE_FILE)}) = 1"
        )

    def _rebuild_script(self, stage: str, staged_columns: list[str]) -> str:
        """One transaction: the changelog holds exactly the files' changes for every change credited to them, and
        the whole current state is re-derived from the changelog."""
        q = quote_column
        data = [c for c in staged_columns if c not in (OP, CHANGE_SEQ, SOURCE_FILE, LOADED_AT)]
        files = f"(SELECT DISTINCT {q(SOURCE_FILE)} FROM {self.ref(stage)})"
        statements = [
            "BEGIN TRANSACTION;",
            f"MERGE {self.ref(self.changelog)} AS c USING ({self._distinct_changes(stage)}) AS s "
            f"ON c.{q(CHANGE_SEQ)} = s.{q(CHANGE_SEQ)} AND c.{q(OP)} = s.{q(OP)} "
            f"WHEN MATCHED THEN UPDATE SET {', '.join(f'{q(c)} = s.{q(c)}' for c in data)} "
            f"WHEN NOT MATCHED THEN INSERT ({', '.join(q(c) for c in staged_columns)}) "
            f"VALUES ({', '.join(f's.{q(c)}' for c in staged_columns)}) "
            f"WHEN NOT MATCHED BY SOURCE AND c.{q(SOURCE_FILE)} IN {files} THEN DELETE;",
        ]
        if self.mapping.primary_key:
            statements.append(self._current_state_statement(stage=None))
        statements.append("COMMIT TRANSACTION;")
        return "\n".join(statements)

    def horizon_sql(self) -> str:
        """SQL for the table's snapshot horizon: changes with a lower sequence precede its latest re-snapshot and
        no longer count for the current state ('' = no re-snapshot: every change counts)."""
        return f"(SELECT COALESCE(MAX(snapshot_horizon), '') FROM {self.ref(self.ledger)})"

    def _current_state_statement(self, stage: str | None, horizon: str | None = None) -> str:
        """MERGE the latest change per key (from the snapshot horizon on) into the current state: for the batch's
        keys, or (stage None) for every key, also removing rows that have no such change at all (inserted behind
        the pipeline's back, or deleted at the source before a re-snapshot)."""
        q = quote_column
        key = self._key()
        columns = [f.name for f in self.bq.get_table(f"{self.project}.{self.dataset}.{self.current}").schema]
        on = " AND ".join(f"t.{q(k)} = l.{q(k)}" for k in key)
        keys = ", ".join(q(k) for k in key)
        since = f"'{horizon}'" if horizon else self.horizon_sql()
        changes = f"SELECT * FROM {self.ref(self.changelog)} AS c WHERE c.{q(CHANGE_SEQ)} >= {since}"
        if stage is not None:
            in_batch = " AND ".join(f"s.{q(k)} = c.{q(k)}" for k in key)
            changes += f" AND EXISTS (SELECT 1 FROM {self.ref(stage)} AS s WHERE {in_batch})"
        latest = (
            f"{changes} QUALIFY ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY {q(CHANGE_SEQ)} DESC) = 1"
        )
        updates = ", ".join(f"{q(c)} = l.{q(c)}" for c in columns if c not in key)
        return (
            f"MERGE {self.ref(self.current)} AS t USING ({latest}) AS l ON {on} "
            f"WHEN MATCHED AND l.{q(OP)} = 'D' THEN DELETE "
            f"WHEN MATCHED THEN UPDATE SET {updates} "
            f"WHEN NOT MATCHED AND l.{q(OP)} != 'D' THEN INSERT ({', '.join(q(c) for c in columns)}) "
            f"VALUES ({', '.join(f'l.{q(c)}' for c in columns)})"
            + (" WHEN NOT MATCHED BY SOURCE THEN DELETE;" if stage is None else ";")
        )

    def _ledger_statement(self, stage: str, batch: str) -> str:
        """Record the batch's files as loaded, in the batch's own transaction (each file once)."""
        q = quote_column
        return (
            f"MERGE {self.ref(self.ledger)} AS f USING (SELECT {q(SOURCE_FILE)} AS source_file, COUNT(*) AS row_count, "
            f"'{batch}' AS batch, {self.load_jobs} AS load_jobs, CURRENT_TIMESTAMP() AS loaded_at "
            f"FROM {self.ref(stage)} GROUP BY {q(SOURCE_FILE)}) AS s ON f.source_file = s.source_file "
            "WHEN NOT MATCHED THEN INSERT (source_file, row_count, batch, load_jobs, loaded_at) "
            "VALUES (s.source_file, s.row_count, s.batch, s.load_jobs, s.loaded_at);"
        )

    def _horizon_statement(self, batch: str, horizon: str, rows: int) -> str:
        """Record a re-snapshot's horizon in the ledger (a marker row: the snapshot may have no rows at all)."""
        return (
            f"INSERT INTO {self.ref(self.ledger)} (source_file, row_count, batch, load_jobs, loaded_at, "
            f"snapshot_horizon) VALUES ('{SNAPSHOT_MARKER}{horizon}', {int(rows)}, '{batch}', {self.load_jobs}, "
            f"CURRENT_TIMESTAMP(), '{horizon}');"
        )

    def loaded_files(self, keys: list[str] | None = None) -> set[str]:
        """The files recorded as loaded (restricted to `keys` when given)."""
        try:
            self.bq.get_table(f"{self.project}.{self.dataset}.{self.ledger}")
        except exceptions.NotFound:
            return set()
        sql = f"SELECT source_file FROM {self.ref(self.ledger)}"
        params: list[Any] = []
        if keys is not None:
            sql += " WHERE source_file IN UNNEST(@keys)"
            params = [bigquery.ArrayQueryParameter("keys", "STRING", sorted(keys))]
        job = self.bq.query(sql, job_config=bigquery.QueryJobConfig(query_parameters=params))
        return {row.source_file for row in job.result()}

    def load_jobs_on(self, day: dt.date) -> int:
        """Load jobs this table's successful batches used on `day` (UTC), from the ledger."""
        try:
            self.bq.get_table(f"{self.project}.{self.dataset}.{self.ledger}")
        except exceptions.NotFound:
            return 0
        sql = (
            f"SELECT COALESCE(SUM(jobs), 0) AS n FROM (SELECT batch, MAX(load_jobs) AS jobs "
            f"FROM {self.ref(self.ledger)} WHERE DATE(loaded_at) = @day GROUP BY batch)"
        )
        config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("day", "DATE", day)])
        return int(next(iter(self.bq.query(sql, job_config=config).result())).n)


LEDGER_FIELDS = [
    bigquery.SchemaField("source_file", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("row_count", "INTEGER"),
    bigquery.SchemaField("batch", "STRING"),
    bigquery.SchemaField("load_jobs", "INTEGER"),
    bigquery.SchemaField("loaded_at", "TIMESTAMP"),
    bigquery.SchemaField("snapshot_horizon", "STRING"),  # set on a re-snapshot's marker row
]
SNAPSHOT_MARKER = "snapshot@"


def _job_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64]


def quote_column(name: str) -> str:
    """A column name quoted for BigQuery SQL; refused unless it is a plain identifier."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,299}", name):
        raise LoadError(
            f"column {name!r} is not a valid BigQuery column name; rename it at the source or map around it"
        )
    return f"`{name}`"


def _base_type(field_type: str) -> str:
    return {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN"}.get(field_type, field_type)
