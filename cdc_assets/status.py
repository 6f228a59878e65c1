"""Table status: per mapped table, what an analyst needs to manage it without a data engineer.

Cluster, the last source commit loaded into BigQuery and how long ago that was (lag), rows changed today by op,
the last result of each asset check, files landed but not loaded yet, and dead-letter messages. Read from the
same places the pipeline writes: the changelog and ledger in BigQuery, the landing bucket, the dead-letter queue
and the Dagster instance's event log. `cdc status` prints it (or `--json`).
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import dagster as dg
from dagster._core.storage.asset_check_execution_record import COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES
from google.api_core import exceptions
from google.cloud import bigquery

from cdc.landing import NotALandingFile, PoisonMessage, parse_key, parse_message
from cdc.mappings import ClusterMapping, Mappings, TableMapping
from cdc_assets.checks import FILES_LOADED, ROW_COUNT, landed_and_unloaded
from cdc_assets.content_check import CONTENT
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import NO_DUPLICATES
from cdc_assets.resources import LandingResource
from cdc_assets.targets import Q_COMMIT_TS, Q_OP, TableTargets

WORKERS = 8
RECENT_DAYS = 7  # how far back the changelog is read for the last loaded commit (bounds the bytes scanned)


@dataclass
class TableStatus:
    cluster: str
    source: str
    target: str
    last_commit_loaded: str | None = None  # UTC, of the newest change in the changelog (last RECENT_DAYS)
    lag_s: float | None = None  # now - last_commit_loaded
    rows_today: dict[str, int] = field(default_factory=dict)  # by op (I/U/D), by commit day UTC
    files_waiting: int = 0  # landed yesterday or today, not loaded yet
    dead_letters: int = 0
    checks: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # name -> passed, severity, at, description

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _changelog_summary(targets: TableTargets, now: dt.datetime) -> tuple[dt.datetime | None, dict[str, int]]:
    today = f"DATE({Q_COMMIT_TS}) = @today"
    sql = (
        f"SELECT MAX({Q_COMMIT_TS}) AS last, "
        f"COUNTIF({today} AND {Q_OP} = 'I') AS i, "
        f"COUNTIF({today} AND {Q_OP} = 'U') AS u, "
        f"COUNTIF({today} AND {Q_OP} = 'D') AS d "
        f"FROM {targets.ref(targets.changelog)} WHERE {Q_COMMIT_TS} >= @since"
    )
    config = bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ScalarQueryParameter("today", "DATE", now.date()),
            bigquery.ScalarQueryParameter("since", "TIMESTAMP", now - dt.timedelta(days=RECENT_DAYS)),
        ]
    )
    try:
        row = next(iter(targets.bq.query(sql, job_config=config).result()))
    except exceptions.NotFound:
        return None, {}
    return row.last, {"I": int(row.i or 0), "U": int(row.u or 0), "D": int(row.d or 0)}


def dead_letters_by_table(landing: LandingResource, mappings: Mappings) -> tuple[dict[str, int], int]:
    """Dead-letter messages per mapped source table, and how many name no mapped table."""
    sources = {(t.source_schema, t.source_table): t.source for _, t in mappings.tables()}
    counts: dict[str, int] = {}
    other = 0
    for message in landing.dead_letters(hide_seconds=2):
        try:
            keys = parse_message(message).keys
        except PoisonMessage:
            keys = []
        tables = set()
        for key in keys:
            try:
                landed = parse_key(key, landing.prefix)
            except NotALandingFile:
                continue
            if (landed.schema, landed.table) in sources:
                tables.add(sources[(landed.schema, landed.table)])
        for table in tables:
            counts[table] = counts.get(table, 0) + 1
        other += not tables
    return counts, other


def last_checks(instance: dg.DagsterInstance | None, tables: list[TableMapping]) -> dict[str, dict[str, Any]]:
    """Per table target: the latest evaluation of each of its asset checks recorded in the Dagster instance."""
    if instance is None:
        return {}
    target_of = {bigquery_asset_key(table): table.target for table in tables}
    keys = [
        dg.AssetCheckKey(asset, name)
        for asset in target_of
        for name in (NO_DUPLICATES, ROW_COUNT, CONTENT, FILES_LOADED)
    ]
    storage = instance.event_log_storage
    out: dict[str, dict[str, Any]] = {}
    for key, record in storage.get_latest_asset_check_execution_by_key(keys).items():
        checks = out.setdefault(target_of[key.asset_key], {})
        result = _evaluation(record)
        if result is None:  # planned: a run evaluating it now - show the last result until it has a new one
            done = storage.get_asset_check_execution_history(
                key, limit=1, status=COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES
            )
            result = _evaluation(done[0]) if done else None
            checks[key.name] = {**(result or {}), "status": str(record.status.value).lower()}
            continue
        checks[key.name] = result
    return out


def _evaluation(record: Any) -> dict[str, Any] | None:
    entry = record.event
    evaluation: Any = entry.dagster_event.event_specific_data if entry and entry.dagster_event else None
    if entry is None or evaluation is None or not hasattr(evaluation, "passed"):
        return None
    return {
        "passed": bool(evaluation.passed),
        "severity": evaluation.severity.value,
        "at": dt.datetime.fromtimestamp(entry.timestamp, dt.UTC).isoformat(timespec="seconds"),
        "description": evaluation.description or "",
    }


def table_status(
    cluster: ClusterMapping,
    table: TableMapping,
    landing: LandingResource,
    bq: bigquery.Client,
    now: dt.datetime,
) -> TableStatus:
    targets = TableTargets(bq, table)
    status = TableStatus(cluster.cluster, table.source, table.target)
    last, status.rows_today = _changelog_summary(targets, now)
    if last is not None:
        status.last_commit_loaded = last.astimezone(dt.UTC).isoformat(timespec="microseconds")
        status.lag_s = round((now - last).total_seconds(), 3)
    status.files_waiting = len(landed_and_unloaded(landing, targets)[1])
    return status


def collect(
    mappings: Mappings,
    landing: LandingResource,
    bq: bigquery.Client,
    instance: dg.DagsterInstance | None = None,
    only: str | None = None,
) -> tuple[list[TableStatus], int]:
    """The status of every mapped table (or the one named by target or source), and the dead-letter messages that
    name no mapped table."""
    now = dt.datetime.now(dt.UTC)
    selected = [(c, t) for c, t in mappings.tables() if not only or only in (t.target, t.source)]
    dead, unmapped = dead_letters_by_table(landing, mappings)
    checks = last_checks(instance, [t for _, t in selected])
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:  # a few queries and listings per table, I/O-bound
        statuses = list(pool.map(lambda ct: table_status(ct[0], ct[1], landing, bq, now), selected))
    for status in statuses:
        status.dead_letters = dead.get(status.source, 0)
        status.checks = checks.get(status.target, {})
    return statuses, unmapped


def row_counts(mappings: Mappings, bq: bigquery.Client) -> list[tuple[str, int]]:
    """Every mapped table's current-state and changelog row counts (tables not created yet are left out)."""
    counts = []
    for _, table in mappings.tables():
        targets = TableTargets(bq, table)
        for name in dict.fromkeys((targets.current, targets.changelog)):
            try:
                row = next(iter(bq.query(f"SELECT COUNT(*) AS n FROM {targets.ref(name)}").result()))
            except exceptions.NotFound:
                continue
            counts.append((f"{targets.dataset}.{name}", int(row.n)))
    return counts
