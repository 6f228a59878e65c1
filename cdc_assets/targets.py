"""The BigQuery tables of one mapped table, and what the pipeline reads back from them.

Current state at the mapped `dataset.table`; the changelog beside it as `dataset.table_changelog` (an append-only
table's changes land at the mapped name itself); the ledger of loaded files `dataset.table_loaded_files`. The
metadata columns the changelog adds to the source columns are named here (docs/design.md, "BigQuery tables").
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from google.api_core import exceptions
from google.cloud import bigquery

from cdc.mappings import TableMapping, quote_bigquery

OP, COMMIT_TS, CHANGE_SEQ, SOURCE_FILE, LOADED_AT = (
    "_op",
    "_commit_ts",
    "_change_seq",
    "_source_file",
    "_loaded_at",
)
METADATA_COLUMNS = (OP, COMMIT_TS, CHANGE_SEQ, SOURCE_FILE, LOADED_AT)
LEDGER_SUFFIX = "_loaded_files"
SNAPSHOT_MARKER = "snapshot@"  # a re-snapshot's marker row in the ledger: source_file = marker + horizon
TRUNCATE_MARKER = (
    "truncate@"  # a TRUNCATE at the source is a horizon too: no change before it counts any more
)

LEDGER_FIELDS = [
    bigquery.SchemaField("source_file", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("row_count", "INTEGER"),
    bigquery.SchemaField("batch", "STRING"),
    bigquery.SchemaField("load_jobs", "INTEGER"),
    bigquery.SchemaField("loaded_at", "TIMESTAMP"),
    bigquery.SchemaField("snapshot_horizon", "STRING"),  # set on a re-snapshot's marker row
]


class LoadError(RuntimeError):
    """A batch that cannot be loaded; the message names the table, the file or job, and what to do."""


def quote_column(name: str) -> str:
    """A column name quoted for BigQuery SQL; refused unless it is a plain identifier."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,299}", name):
        raise LoadError(
            f"column {name!r} is not a valid BigQuery column name; rename it at the source or map around it"
        )
    return f"`{name}`"


# the metadata columns, quoted for SQL
Q_OP, Q_COMMIT_TS, Q_CHANGE_SEQ, Q_SOURCE_FILE = (
    f"`{name}`" for name in (OP, COMMIT_TS, CHANGE_SEQ, SOURCE_FILE)
)


class TableTargets:
    """Names and references of a mapped table's BigQuery tables, and reads of them."""

    def __init__(self, bq: bigquery.Client, mapping: TableMapping):
        self.bq = bq
        self.mapping = mapping
        self.project = bq.project
        self.dataset = mapping.target_dataset
        self.current = mapping.target_table
        # An append-only table's changes are its content: they land at the mapped name, with no separate state.
        self.changelog = mapping.changelog_table if mapping.primary_key else mapping.target_table
        self.ledger = f"{mapping.target_table}{LEDGER_SUFFIX}"
        # the tables this object ensured, and their schema
        self.schemas: dict[str, list[bigquery.SchemaField]] = {}

    def ref(self, table: str) -> str:
        """A table of this dataset, as a quoted SQL reference."""
        return quote_bigquery(self.project, self.dataset, table)

    def table_id(self, table: str) -> str:
        return f"{self.project}.{self.dataset}.{table}"

    def exists(self, table: str) -> bool:
        try:
            self.bq.get_table(self.table_id(table))
        except exceptions.NotFound:
            return False
        return True

    def ensure(
        self,
        name: str,
        fields: list[bigquery.SchemaField],
        partition: str | None = None,
        cluster: list[str] | None = None,
        primary_key: list[str] | None = None,
        max_staleness: str = "",
    ) -> list[bigquery.SchemaField]:
        """Create a table of this dataset (day-partitioned, clustered, with a primary key and max_staleness as
        given), or widen it by the fields it lacks; its schema. A field whose type changed raises LoadError naming
        the column and the remedy. A primary key asked for and not declared yet is declared (native CDC needs it)."""
        try:
            table = self.bq.get_table(self.table_id(name))
        except exceptions.NotFound:
            # only for a new table: on every load the call would wait behind the server's writes
            self.bq.create_dataset(self.dataset, exists_ok=True)
            table = bigquery.Table(self.table_id(name), schema=fields)
            if partition:
                table.time_partitioning = bigquery.TimePartitioning(
                    type_=bigquery.TimePartitioningType.DAY, field=partition
                )
            if cluster:
                table.clustering_fields = cluster
            if primary_key:
                table.table_constraints = _primary_key(primary_key)
                if max_staleness:
                    table.max_staleness = max_staleness
            self.schemas[name] = list(self.bq.create_table(table, exists_ok=True).schema)
            return self.schemas[name]
        check_compatible(
            self.mapping, f"{self.dataset}.{name}", table.schema, fields, self.type_change_remedy()
        )
        have = {f.name for f in table.schema}
        added = [
            bigquery.SchemaField(f.name, f.field_type, mode="NULLABLE") for f in fields if f.name not in have
        ]
        changed = []
        if added:
            table.schema = [*table.schema, *added]
            changed.append("schema")
        if primary_key and not (table.table_constraints and table.table_constraints.primary_key):
            table.table_constraints = _primary_key(primary_key)  # a table batch mode created, now streaming
            changed.append("table_constraints")
        if changed:
            table = self.bq.update_table(table, changed)
        self.schemas[name] = list(table.schema)
        return self.schemas[name]

    def type_change_remedy(self) -> str:
        tables = f"{self.dataset}.{self.current}" + (
            f" and {self.dataset}.{self.changelog}" if self.mapping.primary_key else ""
        )
        if self.mapping.primary_key:
            return (
                f"rename or drop {tables}, then run the resnapshot_table job for {self.mapping.target} (it "
                "recreates both with the new type)"
            )
        return (
            f"rename or drop {tables}, then redrive the dead-lettered messages or backfill the days since the "
            "change (the table is recreated with the new type)"
        )

    def horizon_sql(self) -> str:
        """SQL for the table's snapshot horizon: changes with a lower sequence precede its latest re-snapshot and
        no longer count for the current state ('' = no re-snapshot: every change counts)."""
        return f"(SELECT COALESCE(MAX(snapshot_horizon), '') FROM {self.ref(self.ledger)})"

    def horizon(self) -> str:
        """The table's snapshot horizon now ('' = none)."""
        if not self.exists(self.ledger):
            return ""
        return str(next(iter(self.bq.query(f"SELECT {self.horizon_sql()} AS h").result())).h or "")

    def duplicate_changes(self) -> tuple[int, int]:
        """(changes, duplicated changes) in the changelog; a change is identified by sequence and Op."""
        if not self.exists(self.changelog):
            return 0, 0
        sql = (
            f"SELECT COUNT(*) AS n, COUNT(*) - COUNT(DISTINCT CONCAT(`{CHANGE_SEQ}`, `{OP}`)) AS d "
            f"FROM {self.ref(self.changelog)}"
        )
        row = next(iter(self.bq.query(sql).result()))
        return int(row.n), int(row.d)

    def loaded_files(self, keys: list[str] | None = None) -> set[str]:
        """The files recorded as loaded (restricted to `keys` when given)."""
        if not self.exists(self.ledger):
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
        if not self.exists(self.ledger):
            return 0
        sql = (
            f"SELECT COALESCE(SUM(jobs), 0) AS n FROM (SELECT batch, MAX(load_jobs) AS jobs "
            f"FROM {self.ref(self.ledger)} WHERE DATE(loaded_at) = @day GROUP BY batch)"
        )
        config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("day", "DATE", day)])
        return int(next(iter(self.bq.query(sql, job_config=config).result())).n)


def _primary_key(columns: list[str]) -> bigquery.table.TableConstraints:
    return bigquery.table.TableConstraints(
        primary_key=bigquery.table.PrimaryKey(columns=columns), foreign_keys=None
    )


def check_compatible(
    mapping: TableMapping,
    table: str,
    have: list[bigquery.SchemaField],
    wanted: list[bigquery.SchemaField],
    remedy: str,
) -> None:
    """Raise LoadError naming the column when a landed column's type cannot go into the existing column."""
    existing = {f.name: f for f in have}
    for field in wanted:
        if field.name in existing and _base_type(existing[field.name].field_type) != _base_type(
            field.field_type
        ):
            raise LoadError(
                f"{mapping.source}: incompatible type change - column {field.name} is "
                f"{existing[field.name].field_type} in {table} but {field.field_type} in the landed "
                f"files, and BigQuery cannot change it in place. This table stops loading (its files are "
                f"retried, then dead-lettered; other tables go on). To resume: {remedy}"
            )


def _base_type(field_type: str) -> str:
    return {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN"}.get(field_type, field_type)
