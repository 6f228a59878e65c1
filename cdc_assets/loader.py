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

Tables: current state at the mapped `dataset.table`, changelog beside it as `dataset.table_changelog`
(partitioned by commit day, clustered by the primary key).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
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
MAX_ATTEMPTS = 3


class LoadError(RuntimeError):
    """A batch that cannot be loaded; the message names the table, the file or job, and what to do."""


@dataclass(frozen=True)
class LoadResult:
    table: str
    files: int
    rows: int
    rows_by_op: dict[str, int]
    inserted_changes: int
    jobs: int


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


def read_landed(s3: Any, bucket: str, keys: list[str]) -> pa.Table:
    """Every row of the files, with the changelog's metadata columns, in BigQuery-loadable types."""
    parts = []
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        try:
            table = pq.read_table(io.BytesIO(body))
        except Exception as exc:
            raise LoadError(
                f"s3://{bucket}/{key}: not a readable Parquet file ({exc}); it is left unloaded"
            ) from exc
        parts.append(_with_metadata(table, key))
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


def batch_id(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:20]


class TableLoader:
    def __init__(self, bq: bigquery.Client, mapping: TableMapping):
        self.bq = bq
        self.mapping = mapping
        self.project = bq.project
        self.dataset = mapping.target_dataset
        self.current = mapping.target_table
        # An append-only table's changes are its content: they land at the mapped name, with no separate state.
        self.changelog = mapping.changelog_table if mapping.primary_key else mapping.target_table
        self.jobs = 0

    def ref(self, table: str) -> str:
        return quote_bigquery(self.project, self.dataset, table)

    def _key(self) -> list[str]:
        if not self.mapping.primary_key:
            raise LoadError(f"{self.mapping.source}: append-only tables have no current state to merge")
        return list(self.mapping.primary_key)

    # -- exactly-once jobs ---------------------------------------------------------------------------------------

    def run_job(self, base_id: str, submit: Callable[[str], Any]) -> Any:
        """Run a job under `base_id_a<attempt>`; a 409 is answered by the existing job's outcome."""
        last_error: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            job_id = f"{base_id}_a{attempt}"
            try:
                self.jobs += 1
                job = submit(job_id)
                job.result()
                return job
            except exceptions.Conflict:
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
        self.bq.create_dataset(self.dataset, exists_ok=True)
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
                    f"{self.mapping.source}: column {field.name} changed type from {have[field.name].field_type} to "
                    f"{field.field_type}; BigQuery cannot change it in place. Stop this table, migrate "
                    f"{self.dataset}.{name} (or re-snapshot into a new target) and resume"
                )
        added = [
            bigquery.SchemaField(f.name, f.field_type, mode="NULLABLE") for f in fields if f.name not in have
        ]
        if added:
            table.schema = [*table.schema, *added]
            self.bq.update_table(table, ["schema"])

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self, data: pa.Table, keys: list[str]) -> LoadResult:
        batch = batch_id(keys)
        stage = f"_stage_{self.current}_{batch}"
        stage_id = f"{self.project}.{self.dataset}.{stage}"
        self.bq.create_dataset(self.dataset, exists_ok=True)
        buffer = io.BytesIO()
        pq.write_table(data, buffer)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
        )
        base = f"cdc_{self.dataset}_{self.current}_{batch}"

        def submit_load(job_id: str) -> Any:
            buffer.seek(0)
            return self.bq.load_table_from_file(buffer, stage_id, job_config=config, job_id=job_id)

        ops = {item["values"]: item["counts"] for item in pc.value_counts(data[OP]).to_pylist()}
        result = LoadResult(f"{self.dataset}.{self.current}", len(keys), data.num_rows, ops, 0, 0)
        if self._applied(f"{base}_merge"):
            return result  # this exact file set was merged before: nothing to do, nothing twice
        self.run_job(f"{base}_stage", submit_load)
        staged = self.bq.get_table(stage_id).schema
        self.ensure_tables(list(staged))
        script = self._merge_script(stage, [f.name for f in staged])
        before = self._count(self.changelog)
        self.run_job(f"{base}_merge", lambda job_id: self.bq.query(script, job_id=job_id, job_retry=None))
        inserted = self._count(self.changelog) - before
        self.bq.delete_table(stage_id, not_found_ok=True)
        return LoadResult(result.table, result.files, result.rows, ops, inserted, self.jobs)

    def _applied(self, base_id: str) -> bool:
        """Whether a job of this id family finished without error (the batch's commit marker)."""
        for attempt in range(MAX_ATTEMPTS):
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
            f"SELECT COUNT(*) AS n, COUNT(*) - COUNT(DISTINCT CONCAT({_column(CHANGE_SEQ)}, {_column(OP)})) AS d "  # noqa: S608
            f"FROM {self.ref(self.changelog)}"
        )
        row = next(iter(self.bq.query(sql).result()))
        return int(row.n), int(row.d)

    def _count(self, table: str) -> int:
        rows = self.bq.query(f"SELECT COUNT(*) AS n FROM {self.ref(table)}").result()  # noqa: S608
        return int(next(iter(rows)).n)

    def _merge_script(self, stage: str, staged_columns: list[str]) -> str:
        """The batch's transaction. Every identifier is validated and quoted (tables by quote_bigquery)."""
        q = _column
        cols = ", ".join(q(c) for c in staged_columns)
        statements = [
            "BEGIN TRANSACTION;",
            f"MERGE {self.ref(self.changelog)} AS c USING {self.ref(stage)} AS s "  # noqa: S608 - validated, quoted
            f"ON c.{q(CHANGE_SEQ)} = s.{q(CHANGE_SEQ)} AND c.{q(OP)} = s.{q(OP)} "
            f"WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({', '.join(f's.{q(c)}' for c in staged_columns)});",
        ]
        if self.mapping.primary_key:
            key = self._key()
            data_columns = [c for c in staged_columns if c not in (OP, SOURCE_FILE, LOADED_AT)]
            on = " AND ".join(f"t.{q(k)} = l.{q(k)}" for k in key)
            keys_of_batch = ", ".join(q(k) for k in key)
            in_batch = " AND ".join(f"s.{q(k)} = c.{q(k)}" for k in key)
            latest = (
                f"SELECT * FROM {self.ref(self.changelog)} AS c WHERE EXISTS "  # noqa: S608 - validated, quoted
                f"(SELECT 1 FROM {self.ref(stage)} AS s WHERE {in_batch}) "
                f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {keys_of_batch} ORDER BY {q(CHANGE_SEQ)} DESC) = 1"
            )
            updates = ", ".join(f"{q(c)} = l.{q(c)}" for c in data_columns if c not in key)
            statements.append(
                f"MERGE {self.ref(self.current)} AS t USING ({latest}) AS l ON {on} "  # noqa: S608 - validated, quoted
                f"WHEN MATCHED AND l.{q(OP)} = 'D' THEN DELETE "
                f"WHEN MATCHED THEN UPDATE SET {updates} "
                f"WHEN NOT MATCHED AND l.{q(OP)} != 'D' THEN INSERT ({', '.join(q(c) for c in data_columns)}) "
                f"VALUES ({', '.join(f'l.{q(c)}' for c in data_columns)});"
            )
        statements.append("COMMIT TRANSACTION;")
        return "\n".join(statements)


def _column(name: str) -> str:
    """A column name quoted for BigQuery SQL; refused unless it is a plain identifier."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,299}", name):
        raise LoadError(
            f"column {name!r} is not a valid BigQuery column name; rename it at the source or map around it"
        )
    return f"`{name}`"


def _base_type(field_type: str) -> str:
    return {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN"}.get(field_type, field_type)
