"""The SQL of batch mode: one BigQuery script per batch that merges the staged changes into the changelog, sets
the current state of the batch's keys, records the files in the ledger, and reads back what it did.

Pure functions of table references and column names: every table reference comes quoted from `TableTargets.ref`
and every column through `quote_column`; values are integers or change sequences checked by the caller. Why these
statements make a load exactly-once: docs/design.md, "Batch mode".
"""

from __future__ import annotations

from dataclasses import dataclass

from cdc.landing import TRUNCATE_OP
from cdc_assets.targets import (
    CHANGE_SEQ,
    LOADED_AT,
    OP,
    Q_CHANGE_SEQ,
    Q_COMMIT_TS,
    Q_OP,
    Q_SOURCE_FILE,
    SOURCE_FILE,
    quote_column,
)


@dataclass(frozen=True)
class BatchTables:
    """Quoted references of the tables one batch touches."""

    stage: str
    changelog: str
    current: str
    ledger: str


def batch_script(tables: BatchTables, body: list[str], ledger: list[str]) -> str:
    """The whole script: count the changelog, one transaction (body, then the ledger), then its statistics."""
    return "\n".join(
        [
            f"DECLARE changes_before INT64 DEFAULT (SELECT COUNT(*) FROM {tables.changelog});",
            "BEGIN TRANSACTION;",
            *body,
            *ledger,
            "COMMIT TRANSACTION;",
            statistics_query(tables),
        ]
    )


def distinct_changes(stage: str) -> str:
    """The staged changes, each once: two files of one batch may carry the same change (a capture replay)."""
    return f"SELECT * FROM {stage} QUALIFY ROW_NUMBER() OVER (PARTITION BY {Q_CHANGE_SEQ}, {Q_OP} ORDER BY {Q_SOURCE_FILE}) = 1"


def insert_new_changes(tables: BatchTables, staged_columns: list[str]) -> str:
    """Insert the batch's changes the changelog does not hold yet (a change is its sequence and Op)."""
    columns = [quote_column(c) for c in staged_columns]
    return (
        f"MERGE {tables.changelog} AS c USING ({distinct_changes(tables.stage)}) AS s "
        f"ON c.{Q_CHANGE_SEQ} = s.{Q_CHANGE_SEQ} AND c.{Q_OP} = s.{Q_OP} "
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)}) VALUES ({', '.join(f's.{c}' for c in columns)});"
    )


def reset_changes_of_files(tables: BatchTables, staged_columns: list[str]) -> str:
    """A rebuild: the changelog holds exactly the files' changes for every change credited to those files."""
    columns = [quote_column(c) for c in staged_columns]
    data = [quote_column(c) for c in staged_columns if c not in (OP, CHANGE_SEQ, SOURCE_FILE, LOADED_AT)]
    files = f"(SELECT DISTINCT {Q_SOURCE_FILE} FROM {tables.stage})"
    return (
        f"MERGE {tables.changelog} AS c USING ({distinct_changes(tables.stage)}) AS s "
        f"ON c.{Q_CHANGE_SEQ} = s.{Q_CHANGE_SEQ} AND c.{Q_OP} = s.{Q_OP} "
        f"WHEN MATCHED THEN UPDATE SET {', '.join(f'{c} = s.{c}' for c in data)} "
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)}) VALUES ({', '.join(f's.{c}' for c in columns)}) "
        f"WHEN NOT MATCHED BY SOURCE AND c.{Q_SOURCE_FILE} IN {files} THEN DELETE;"
    )


def set_current_state(
    tables: BatchTables, key: list[str], current_columns: list[str], since: str, batch_keys_only: bool
) -> str:
    """MERGE the latest change per key (from the snapshot horizon `since`, an SQL string expression) into the
    current state: for the batch's keys, or for every key - also removing rows that have no such change at all
    (inserted behind the pipeline's back, or deleted at the source before a re-snapshot)."""
    keys = [quote_column(k) for k in key]
    columns = [quote_column(c) for c in current_columns]
    changes = (  # a TRUNCATE's row (no key) counts only as the horizon it sets
        f"SELECT * FROM {tables.changelog} AS c WHERE c.{Q_CHANGE_SEQ} >= {since} AND c.{Q_OP} != '{TRUNCATE_OP}'"
    )
    if batch_keys_only:
        same_key = " AND ".join(f"s.{k} = c.{k}" for k in keys)
        changes += f" AND EXISTS (SELECT 1 FROM {tables.stage} AS s WHERE {same_key})"
    latest = f"{changes} QUALIFY ROW_NUMBER() OVER (PARTITION BY {', '.join(keys)} ORDER BY {Q_CHANGE_SEQ} DESC) = 1"
    updates = ", ".join(f"{c} = l.{c}" for c in columns if c not in keys)
    return (
        f"MERGE {tables.current} AS t USING ({latest}) AS l ON {' AND '.join(f't.{k} = l.{k}' for k in keys)} "
        f"WHEN MATCHED AND l.{Q_OP} = 'D' THEN DELETE "
        f"WHEN MATCHED THEN UPDATE SET {updates} "
        f"WHEN NOT MATCHED AND l.{Q_OP} != 'D' THEN INSERT ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'l.{c}' for c in columns)})"
        + (";" if batch_keys_only else " WHEN NOT MATCHED BY SOURCE THEN DELETE;")
    )


def record_files(tables: BatchTables, batch: str, load_jobs: int) -> str:
    """Record the batch's files as loaded, in the batch's own transaction (each file once)."""
    return (
        f"MERGE {tables.ledger} AS f USING (SELECT {Q_SOURCE_FILE} AS source_file, COUNT(*) AS row_count, "
        f"'{batch}' AS batch, {int(load_jobs)} AS load_jobs, CURRENT_TIMESTAMP() AS loaded_at "
        f"FROM {tables.stage} GROUP BY {Q_SOURCE_FILE}) AS s ON f.source_file = s.source_file "
        "WHEN NOT MATCHED THEN INSERT (source_file, row_count, batch, load_jobs, loaded_at) "
        "VALUES (s.source_file, s.row_count, s.batch, s.load_jobs, s.loaded_at);"
    )


def record_horizon(
    tables: BatchTables, batch: str, horizon: str, rows: int, load_jobs: int, marker: str
) -> str:
    """Record a re-snapshot's horizon in the ledger (a marker row: the snapshot may have no rows at all)."""
    return (
        f"INSERT INTO {tables.ledger} (source_file, row_count, batch, load_jobs, loaded_at, snapshot_horizon) "
        f"VALUES ('{marker}{horizon}', {int(rows)}, '{batch}', {int(load_jobs)}, CURRENT_TIMESTAMP(), '{horizon}');"
    )


def record_truncate(tables: BatchTables, batch: str, sequence: str, marker: str) -> str:
    """Record a TRUNCATE at the source as the table's horizon (once: a rebuild of the day finds it recorded)."""
    name = f"{marker}{sequence}"
    return (
        f"INSERT INTO {tables.ledger} (source_file, row_count, batch, load_jobs, loaded_at, snapshot_horizon) "
        f"SELECT '{name}', 0, '{batch}', 0, CURRENT_TIMESTAMP(), '{sequence}' FROM (SELECT 1) "
        f"WHERE NOT EXISTS (SELECT 1 FROM {tables.ledger} WHERE source_file = '{name}');"
    )


def statistics_query(tables: BatchTables) -> str:
    """What the batch did, read back after its transaction: changes added to the changelog; changelog rows holding
    one of the batch's changes and how many of them repeat one (the batch's commit-time range prunes the
    changelog's partitions); load jobs of the table today."""
    batch_range = f"c.{Q_COMMIT_TS} BETWEEN (SELECT MIN({Q_COMMIT_TS}) FROM {tables.stage}) AND (SELECT MAX({Q_COMMIT_TS}) FROM {tables.stage})"
    in_batch = f"EXISTS (SELECT 1 FROM {tables.stage} AS s WHERE s.{Q_CHANGE_SEQ} = c.{Q_CHANGE_SEQ} AND s.{Q_OP} = c.{Q_OP})"
    return (
        f"SELECT (SELECT COUNT(*) FROM {tables.changelog}) - changes_before AS inserted, "
        f"COUNT(*) AS batch_changes, "
        f"COUNT(*) - COUNT(DISTINCT CONCAT(c.{Q_CHANGE_SEQ}, c.{Q_OP})) AS duplicated, "
        f"(SELECT COALESCE(SUM(jobs), 0) FROM (SELECT batch, MAX(load_jobs) AS jobs FROM {tables.ledger} "
        f"WHERE DATE(loaded_at) = CURRENT_DATE() GROUP BY batch)) AS load_jobs_today "
        f"FROM {tables.changelog} AS c WHERE {batch_range} AND {in_batch};"
    )
