"""Batch mode: a batch of landed files -> one load job into a staging table -> one BigQuery script that merges it
into the changelog and the current state, exactly once (docs/design.md, "Batch mode").

1. The batch is loaded into a staging table named after the file set, under a job id derived from the file set
   plus an attempt number. On 409 the existing job decides: done without error = already loaded; failed = the
   next attempt id (a failed job's id can never be reused).
2. One transaction inserts into the changelog only the changes it does not have (identity: change sequence + Op),
   sets the current state of the batch's keys to their latest change in the whole changelog, and records the
   files in the ledger; the script then reads back what it did. The merge job's id is the batch's commit marker.

A rebuild (a partition backfill) resets the changes credited to the day's files to what the files hold and
re-derives the whole current state; a re-snapshot (a snapshot horizon) re-derives it from the horizon on.
"""

from __future__ import annotations

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

from cdc.mappings import TableMapping
from cdc_assets import merge_sql
from cdc_assets.landed_files import batch_id, truncated_at
from cdc_assets.targets import (
    CHANGE_SEQ,
    COMMIT_TS,
    LEDGER_FIELDS,
    LOADED_AT,
    METADATA_COLUMNS,
    OP,
    SNAPSHOT_MARKER,
    SOURCE_FILE,
    TRUNCATE_MARKER,
    LoadError,
    TableTargets,
)

MAX_ATTEMPTS = 3  # tries per load call
MAX_JOB_IDS = 1000  # attempt ids per job family, over every retry of the batch


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


class MergeLoader(TableTargets):
    """Loads one mapped table's batches by load job + MERGE."""

    def __init__(self, bq: bigquery.Client, mapping: TableMapping):
        super().__init__(bq, mapping)
        self.jobs = 0
        self.load_jobs = 0

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

    # -- tables --------------------------------------------------------------------------------------------------

    def ensure_tables(self, staged: list[bigquery.SchemaField]) -> None:
        """Create or widen the changelog, current-state and ledger tables for the staged columns (the dataset
        exists: the stage table is in it)."""
        meta = {f.name: f for f in staged}
        data_fields = [f for f in staged if f.name not in METADATA_COLUMNS]
        changelog_fields = [
            meta[c] for c in (OP, COMMIT_TS, CHANGE_SEQ, SOURCE_FILE, LOADED_AT)
        ] + data_fields
        key = self._key() if self.mapping.primary_key else []
        self.ensure(self.changelog, changelog_fields, partition=COMMIT_TS, cluster=key[:4])
        if key:
            self.ensure(self.current, [*data_fields, meta[COMMIT_TS], meta[CHANGE_SEQ]], cluster=key[:4])
        self.ensure(self.ledger, LEDGER_FIELDS)

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
        base = self._job_base(batch, rebuild_id, snapshot_horizon)
        ops = {item["values"]: item["counts"] for item in pc.value_counts(data[OP]).to_pylist()}
        result = LoadResult(f"{self.dataset}.{self.current}", len(keys), data.num_rows, ops, 0, 0)
        if self._applied(f"{base}_merge"):
            return replace(result, skipped=True)  # this exact file set was merged before: nothing twice
        stage = f"_stage_{self.current}_{batch}"
        stage_s, staged = self._stage(data, stage, base)
        try:
            self.ensure_tables(staged)
        except LoadError as exc:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise LoadError(f"{exc}. Files of this batch: {shown}") from exc
        truncate = truncated_at(data) if self.mapping.primary_key and not snapshot_horizon else None
        script = self._script(
            stage, [f.name for f in staged], batch, rebuild_id, snapshot_horizon, data.num_rows, truncate
        )
        merge_started = time.monotonic()
        job = self.run_job(
            f"{base}_merge", lambda job_id: self.bq.query(script, job_id=job_id, job_retry=None)
        )
        merge_s = time.monotonic() - merge_started
        rows = list(job.result())  # the script's last statement: what the batch did
        self.bq.delete_table(self.table_id(stage), not_found_ok=True)
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

    def _job_base(self, batch: str, rebuild_id: str | None, snapshot_horizon: str | None) -> str:
        base = f"cdc_{self.dataset}_{self.current}_{batch}"
        if rebuild_id:
            base += f"_rebuild_{re.sub(r'[^A-Za-z0-9_-]', '_', rebuild_id)[:64]}"
        if snapshot_horizon:
            base += f"_snapshot_{snapshot_horizon}"
        return base

    def _stage(self, data: pa.Table, stage: str, base: str) -> tuple[float, list[bigquery.SchemaField]]:
        """Load the batch into its staging table (one load job); (seconds, staged schema). A failed batch keeps its
        stage table: the retry finds its load job done and merges without a new one."""
        self.bq.create_dataset(self.dataset, exists_ok=True)
        buffer = io.BytesIO()
        pq.write_table(data, buffer)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
        )

        def submit(job_id: str) -> Any:
            self.load_jobs += 1
            buffer.seek(0)
            return self.bq.load_table_from_file(
                buffer, self.table_id(stage), job_config=config, job_id=job_id
            )

        started = time.monotonic()
        self.run_job(f"{base}_stage", submit)
        return time.monotonic() - started, list(self.bq.get_table(self.table_id(stage)).schema)

    def _script(
        self,
        stage: str,
        staged_columns: list[str],
        batch: str,
        rebuild_id: str | None,
        snapshot_horizon: str | None,
        rows: int,
        truncate: str | None = None,
    ) -> str:
        """The batch's script; with `truncate` (a TRUNCATE's sequence in the batch) that sequence is recorded as the
        table's horizon first, and the whole current state re-derived from it."""
        tables = merge_sql.BatchTables(
            stage=self.ref(stage),
            changelog=self.ref(self.changelog),
            current=self.ref(self.current),
            ledger=self.ref(self.ledger),
        )
        body = [
            merge_sql.reset_changes_of_files(tables, staged_columns)
            if rebuild_id
            else merge_sql.insert_new_changes(tables, staged_columns)
        ]
        if self.mapping.primary_key:
            current_columns = [f.name for f in self.bq.get_table(self.table_id(self.current)).schema]
            if truncate and re.fullmatch(r"[0-9]{1,64}", truncate):
                body.append(merge_sql.record_truncate(tables, batch, truncate, TRUNCATE_MARKER))
            since = f"'{snapshot_horizon}'" if snapshot_horizon else self.horizon_sql()
            whole = bool(rebuild_id or snapshot_horizon or truncate)  # else only the batch's keys
            body.append(merge_sql.set_current_state(tables, self._key(), current_columns, since, not whole))
        ledger = [merge_sql.record_files(tables, batch, self.load_jobs)]
        if snapshot_horizon:
            ledger.append(
                merge_sql.record_horizon(
                    tables, batch, snapshot_horizon, rows, self.load_jobs, SNAPSHOT_MARKER
                )
            )
        return merge_sql.batch_script(tables, body, ledger)
