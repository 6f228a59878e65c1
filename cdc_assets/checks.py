"""Asset checks comparing the source with BigQuery, per table: `row_count_matches_source` (ERROR; exact at a
consistent snapshot's binlog position, BigQuery rolled back to it), `content_matches_source` (WARN by default; the
values themselves, at such a snapshot) and `landed_files_loaded` (WARN). They run as one multi-check per table in the `table_checks` job and from the UI; every result carries the numbers it compared.
How the row count stays exact under a steady load: docs/design.md, "Checks".
"""

import datetime as dt
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pymysql
from google.cloud import bigquery

from cdc.landing import ControlDocuments
from cdc.mappings import ClusterMapping, TableMapping, quote_mysql
from cdc.sequence import BinlogPosition
from cdc.settings import Settings
from cdc.source import begin_consistent_snapshot
from cdc_assets.content_check import CONTENT, check_days, compare_content
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import NO_DUPLICATES, duplicate_check, landed_keys_for_day
from cdc_assets.resources import BigQueryCdcResource, LandingResource, MySqlSourceResource
from cdc_assets.targets import COMMIT_TS, Q_CHANGE_SEQ, Q_OP, TableTargets, quote_column

ROW_COUNT = "row_count_matches_source"
FILES_LOADED = "landed_files_loaded"
NO_SUCH_TABLE = 1146  # MySQL/MariaDB ER_NO_SUCH_TABLE


@dataclass
class SourceSnapshot:
    rows: int
    rows_per_day: dict[str, int]
    position: BinlogPosition | None  # None: the source does not report one (MySQL): no exact boundary
    taken_at: dt.datetime

    def boundary(self) -> str | None:
        """The highest change sequence a change inside the snapshot can carry (full-load rows included)."""
        if self.position is None:
            return None
        return self.position.sequence(0)[:25] + "9" * 10


@contextmanager
def consistent_snapshot(
    mysql: MySqlSourceResource, cluster: ClusterMapping
) -> Iterator[tuple[Any, SourceSnapshot]]:
    """A cursor inside a consistent snapshot of the cluster's source, with the snapshot's position and time (the
    counts are the caller's to fill); committed and closed after."""
    connection = mysql.connection(cluster).connect(connect_timeout=mysql.connect_timeout_s)
    try:
        with connection.cursor() as cursor:
            position = begin_consistent_snapshot(cursor)
            cursor.execute("SELECT UTC_TIMESTAMP(6)")
            taken_at = cursor.fetchone()[0].replace(tzinfo=dt.UTC)
            yield cursor, SourceSnapshot(0, {}, position, taken_at)
        connection.commit()
    finally:
        connection.close()


def source_snapshot(
    mysql: MySqlSourceResource, cluster: ClusterMapping, table: TableMapping
) -> SourceSnapshot:
    ref = f"{quote_mysql(table.source_schema)}.{quote_mysql(table.source_table)}"
    days = check_days()
    with consistent_snapshot(mysql, cluster) as (cursor, snapshot):
        cursor.execute(f"SELECT COUNT(*) FROM {ref}")
        snapshot.rows = int(cursor.fetchone()[0])
        if table.partition_column:
            column = quote_mysql(table.partition_column)
            cursor.execute(
                f"SELECT DATE({column}), COUNT(*) FROM {ref} WHERE {column} >= %s AND {column} < %s GROUP BY 1",
                (days[0], days[-1] + dt.timedelta(days=1)),
            )
            found = {str(day): int(n) for day, n in cursor.fetchall()}
            snapshot.rows_per_day = {day.isoformat(): found.get(day.isoformat(), 0) for day in days}
    return snapshot


def landed_and_unloaded(landing: LandingResource, targets: TableTargets) -> tuple[list[str], list[str]]:
    """Files landed for the table on the check days (yesterday and today), and those of them not loaded yet."""
    landed = [k for day in check_days() for k in landed_keys_for_day(landing, targets.mapping, day)]
    return landed, sorted(set(landed) - targets.loaded_files(landed))


@dataclass
class Completeness:
    exact: bool
    waiting_for: list[str] = field(default_factory=list)
    checkpoint: str = ""
    # not exact because the pipeline is behind the snapshot (the capture, or files landed and not loaded): a
    # comparison would not count, so none is made. Without a position or a checkpoint (MySQL, DMS landings) it is
    # not exact either, but the comparison is still made and reported, for a person to read
    catching_up: bool = False


def completeness(
    landing: LandingResource, targets: TableTargets, cluster: ClusterMapping, snapshot: SourceSnapshot
) -> Completeness:
    """Whether BigQuery holds every change up to the snapshot: the capture has checkpointed past it, and every
    landed file with a change at or before it is loaded. A capture behind the snapshot decides it: the landed files
    are not looked at then (a listing, a ledger query and a read of every file not loaded, while catching up)."""
    boundary = snapshot.boundary()
    if boundary is None or snapshot.position is None:
        return Completeness(False, ["the source reports no binlog snapshot position (MariaDB does)"])
    s3 = landing.s3()
    checkpoint = ControlDocuments(s3, landing.bucket, landing.prefix).read("checkpoints", cluster.cluster)
    if not checkpoint or "file" not in checkpoint:
        return Completeness(
            False, [f"no capture checkpoint for cluster {cluster.cluster} in the landing bucket"]
        )
    at = BinlogPosition(str(checkpoint["file"]), int(checkpoint["pos"]))
    result = Completeness(True, checkpoint=f"{at.file}:{at.pos}")
    if at.key() < snapshot.position.key():
        result.exact, result.catching_up = False, True
        result.waiting_for.append(
            f"capture checkpoint {at.file}:{at.pos} is before the snapshot "
            f"{snapshot.position.file}:{snapshot.position.pos}"
        )
        return result
    _, pending = landed_and_unloaded(landing, targets)
    for key in pending:
        body = s3.get_object(Bucket=landing.bucket, Key=key)["Body"].read()
        try:
            first = pq.read_metadata(io.BytesIO(body)).metadata.get(b"cdc.first_sequence", b"").decode()
        except Exception:
            first = ""
        if not first or first <= boundary:
            result.exact, result.catching_up = False, True
            result.waiting_for.append(f"{key} (landed, not loaded yet)")
    return result


def _bigquery_counts(targets: TableTargets, table: TableMapping, boundary: str | None) -> dict[str, Any]:
    """BigQuery's current-state rows now, and rolled back to `boundary` (overall and per check day)."""
    days = [d.isoformat() for d in check_days()]
    day_of = (
        f"CAST(DATE({quote_column(table.partition_column)}) AS STRING)" if table.partition_column else "NULL"
    )
    params: list[Any] = [bigquery.ScalarQueryParameter("boundary", "STRING", boundary or "9" * 35)]
    try:
        targets.bq.get_table(f"{targets.project}.{targets.dataset}.{targets.current}")
    except Exception:
        return {
            "rows": 0,
            "delta": 0,
            "per_day": dict.fromkeys(days, 0),
            "delta_per_day": dict.fromkeys(days, 0),
        }
    current_rows = targets.bq.query(
        f"SELECT {day_of} AS day, COUNT(*) AS n FROM {targets.ref(targets.current)} GROUP BY 1"
    ).result()
    per_day: dict[str, int] = dict.fromkeys(days, 0)
    total = 0
    for row in current_rows:
        total += int(row.n)
        if row.day in per_day:
            per_day[row.day] = int(row.n)
    if table.primary_key:
        keys = ", ".join(quote_column(k) for k in table.primary_key)
        changelog = targets.ref(targets.changelog)
        latest = f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY {Q_CHANGE_SEQ} DESC) = 1"
        same_key = " AND ".join(f"a.{quote_column(k)} = c.{quote_column(k)}" for k in table.primary_key)
        touched = (
            f"SELECT * FROM {changelog} AS c WHERE c.{Q_CHANGE_SEQ} >= {targets.horizon_sql()} AND EXISTS "
            f"(SELECT 1 FROM {changelog} AS a WHERE a.{Q_CHANGE_SEQ} > @boundary AND {same_key})"
        )
        sql = (
            f"SELECT 'now' AS side, {day_of} AS day, COUNTIF({Q_OP} != 'D') AS n FROM ({touched} {latest}) GROUP BY 1, 2 "
            f"UNION ALL SELECT 'then' AS side, {day_of} AS day, COUNTIF({Q_OP} != 'D') AS n FROM "
            f"(SELECT * FROM ({touched}) WHERE {Q_CHANGE_SEQ} <= @boundary {latest}) GROUP BY 1, 2"
        )
    else:  # append-only: the rows after the boundary are the whole difference
        sql = (
            f"SELECT 'now' AS side, {day_of} AS day, COUNT(*) AS n FROM {targets.ref(targets.changelog)} "
            f"WHERE {Q_CHANGE_SEQ} > @boundary GROUP BY 1, 2"
        )
    job = targets.bq.query(sql, job_config=bigquery.QueryJobConfig(query_parameters=params))
    delta = 0
    delta_per_day: dict[str, int] = dict.fromkeys(days, 0)
    for row in job.result():
        sign = 1 if row.side == "now" else -1
        delta += sign * int(row.n)
        if row.day in delta_per_day:
            delta_per_day[row.day] += sign * int(row.n)
    return {"rows": total, "delta": delta, "per_day": per_day, "delta_per_day": delta_per_day}


def row_count_result(
    cluster: ClusterMapping,
    table: TableMapping,
    landing: LandingResource,
    targets: TableTargets,
    mysql: MySqlSourceResource,
) -> dg.AssetCheckResult:
    try:
        snapshot = source_snapshot(mysql, cluster, table)
    except pymysql.err.ProgrammingError as exc:
        if not exc.args or exc.args[0] != NO_SUCH_TABLE:
            raise
        return dg.AssetCheckResult(
            check_name=ROW_COUNT,
            asset_key=bigquery_asset_key(table),
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"{table.source} does not exist at the source (cluster {cluster.cluster}): create it "
            "there, or remove it from (or disable it in) the cluster's mapping file and deploy the mappings",
            metadata={"source_error": str(exc.args[-1])},
        )
    state = completeness(landing, targets, cluster, snapshot)
    if state.catching_up:  # BigQuery's rows at the snapshot would not count: not asked for (bytes, and time)
        return dg.AssetCheckResult(
            check_name=ROW_COUNT,
            asset_key=bigquery_asset_key(table),
            passed=True,
            severity=dg.AssetCheckSeverity.ERROR,
            description=not_comparable(state),
            metadata={
                "source_rows": snapshot.rows,
                **snapshot_metadata(snapshot, state),
            },
        )
    counts = _bigquery_counts(targets, table, snapshot.boundary())
    at_snapshot = counts["rows"] - counts["delta"]
    mismatches = []
    if at_snapshot != snapshot.rows:
        mismatches.append(f"all rows: source {snapshot.rows}, BigQuery {at_snapshot}")
        if at_snapshot > snapshot.rows:
            mismatches.append(
                "BigQuery holds rows the source no longer has: deleted without a change reaching BigQuery (a "
                "TRUNCATE landed by AWS DMS, which writes nothing for it, or rows deleted with the binlog off) - "
                "re-snapshot the table (resnapshot_table job; with DMS reload the table in the task, then backfill)"
            )
    per_day: dict[str, Any] = {}
    for day, source_rows in snapshot.rows_per_day.items():
        bigquery_rows = counts["per_day"][day] - counts["delta_per_day"][day]
        per_day[day] = {"source": source_rows, "bigquery": bigquery_rows}
        if bigquery_rows != source_rows:
            mismatches.append(
                f"{table.partition_column} on {day}: source {source_rows}, BigQuery {bigquery_rows}"
            )
    passed = not mismatches or not state.exact
    if state.exact:
        summary = "equal" if passed else "MISMATCH - " + "; ".join(mismatches)
    else:
        summary = not_comparable(state)
    return dg.AssetCheckResult(
        check_name=ROW_COUNT,
        asset_key=bigquery_asset_key(table),
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=summary,
        metadata={
            "source_rows": snapshot.rows,
            "bigquery_rows": counts["rows"],
            "bigquery_rows_at_snapshot": at_snapshot,
            "loaded_changes_after_snapshot_net": counts["delta"],
            **snapshot_metadata(snapshot, state),
            "per_day": dg.MetadataValue.json(per_day),
        },
    )


def not_comparable(state: Completeness) -> str:
    if state.catching_up:
        return "not comparable yet (pipeline catching up): " + "; ".join(state.waiting_for[:3])
    return "not exact (compared, for reading only): " + "; ".join(state.waiting_for[:3])


def snapshot_metadata(snapshot: SourceSnapshot, state: Completeness) -> dict[str, Any]:
    """Where the source's snapshot was taken, and what BigQuery still waits for to be exact at it."""
    return {
        "exact": state.exact,
        "snapshot_position": f"{snapshot.position.file}:{snapshot.position.pos}" if snapshot.position else "",
        "capture_checkpoint": state.checkpoint,
        "waiting_for": dg.MetadataValue.json(state.waiting_for[:20]),
        "source_snapshot_at": snapshot.taken_at.isoformat(),
    }


def files_loaded_result(
    table: TableMapping, landing: LandingResource, targets: TableTargets, grace_seconds: float
) -> dg.AssetCheckResult:
    grace = dt.timedelta(seconds=grace_seconds)
    now = dt.datetime.now(dt.UTC)
    s3 = landing.s3()
    landed, unloaded = landed_and_unloaded(landing, targets)
    overdue = [
        k for k in unloaded if now - s3.head_object(Bucket=landing.bucket, Key=k)["LastModified"] > grace
    ]
    return dg.AssetCheckResult(
        check_name=FILES_LOADED,
        asset_key=bigquery_asset_key(table),
        passed=not overdue,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{len(overdue)} file(s) landed more than {grace.total_seconds():.0f} s ago are not loaded; "
            "materialize their day (a backfill) or look for failed runs"
            if overdue
            else "every landed file is loaded"
        ),
        metadata={
            "landed_files": len(landed),
            "loaded_files": len(landed) - len(unloaded),
            "in_flight_files": len(unloaded) - len(overdue),
            "overdue_files": len(overdue),
            "overdue": dg.MetadataValue.json(overdue[:20]),
        },
    )


def recent_duplicates_result(table: TableMapping, targets: TableTargets) -> dg.AssetCheckResult:
    """Changes held more than once in the changelog's partitions of yesterday and today (a change and its copy share
    their commit time, so a duplicate is always inside one partition): the streaming mode's proof of exactly-once,
    at the cost of reading two partitions every check run instead of a query per load."""
    changes, duplicated = 0, 0
    if targets.exists(targets.changelog):
        since = dt.datetime.combine(check_days()[0], dt.time(), dt.UTC)
        sql = (
            f"SELECT COUNT(*) AS n, COUNT(*) - COUNT(DISTINCT CONCAT({Q_CHANGE_SEQ}, {Q_OP})) AS d "
            f"FROM {targets.ref(targets.changelog)} WHERE `{COMMIT_TS}` >= @since"
        )
        config = bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter("since", "TIMESTAMP", since)]
        )
        row = next(iter(targets.bq.query(sql, job_config=config).result()))
        changes, duplicated = int(row.n), int(row.d)
    return duplicate_check(table, changes, duplicated, scope="yesterday and today")


def content_result(
    cluster: ClusterMapping,
    table: TableMapping,
    landing: LandingResource,
    targets: TableTargets,
    mysql: MySqlSourceResource,
    settings: Settings,
) -> dg.AssetCheckResult:
    """content_matches_source: the digests of both sides at one consistent snapshot (see cdc_assets.content_check);
    passed while the pipeline has not caught up with that snapshot (then `exact` is false, and nothing is compared),
    as the row count. A table too big to compare whole is compared a different window of keys each cycle of the
    checks."""
    level = (
        dg.AssetCheckSeverity.ERROR
        if settings.content_check_severity == "ERROR"
        else dg.AssetCheckSeverity.WARN
    )
    with consistent_snapshot(mysql, cluster) as (cursor, snapshot):
        # BigQuery is complete up to the snapshot, or the comparison would not count (a file loaded later does not
        # change that: the comparison rolls BigQuery back to the snapshot's boundary)
        state = completeness(landing, targets, cluster, snapshot)
        if state.catching_up:
            return dg.AssetCheckResult(
                check_name=CONTENT,
                asset_key=bigquery_asset_key(table),
                passed=True,
                severity=level,
                description=not_comparable(state),
                metadata=snapshot_metadata(snapshot, state),
            )
        comparison = (
            compare_content(
                cursor,
                targets,
                cluster,
                table,
                snapshot.boundary() or "9" * 35,
                settings.content_check_max_rows,
                settings.table_checks_cycle_minutes * 60,
            )
            if targets.exists(targets.current)
            else None
        )
    if comparison is None:
        return dg.AssetCheckResult(
            check_name=CONTENT,
            asset_key=bigquery_asset_key(table),
            passed=True,
            severity=level,
            description=f"{targets.dataset}.{targets.current} does not exist yet: nothing to compare",
            metadata={"exact": False},
        )
    mismatched = comparison.mismatched_chunks
    passed = not mismatched or not state.exact
    if not state.exact:
        summary = not_comparable(state)
    elif passed:
        summary = f"equal: {comparison.source.rows:,} rows, {len(comparison.compared)} columns"
    else:
        summary = (
            f"MISMATCH in {len(mismatched)} chunk(s) of {comparison.chunking}: {', '.join(mismatched[:10])}"
            + (f"; first differences: {'; '.join(comparison.differing)}" if comparison.differing else "")
            + ". Re-snapshot the table (resnapshot_table job) once the cause is fixed"
        )
    return dg.AssetCheckResult(
        check_name=CONTENT,
        asset_key=bigquery_asset_key(table),
        passed=passed,
        severity=level,
        description=summary,
        metadata={
            "exact": state.exact,
            "chunking": comparison.chunking,
            "chunks": len(set(comparison.source.chunks) | set(comparison.bigquery.chunks)),
            "mismatched_chunks": dg.MetadataValue.json(mismatched[:50]),
            "first_differences": dg.MetadataValue.json(comparison.differing),
            "source_rows_compared": comparison.source.rows,
            "bigquery_rows_compared": comparison.bigquery.rows,
            "columns_compared": len(comparison.compared),
            "columns_not_compared": dg.MetadataValue.json(comparison.skipped),
            "bigquery_bytes_processed": comparison.bytes_processed,
            **snapshot_metadata(snapshot, state),
        },
    )


def build_table_checks(
    cluster: ClusterMapping, table: TableMapping, settings: Settings
) -> dg.AssetChecksDefinition:
    key = bigquery_asset_key(table)
    specs = [
        dg.AssetCheckSpec(
            ROW_COUNT,
            asset=key,
            description=f"{table.source} row count (and per {table.partition_column} day) equals BigQuery's",
        ),
        dg.AssetCheckSpec(FILES_LOADED, asset=key, description="Every landed file is loaded."),
        dg.AssetCheckSpec(
            CONTENT,
            asset=key,
            description=f"Every compared column of {table.source} equals BigQuery's, value for value (digests per "
            "chunk at one snapshot; the first differing keys and columns on a mismatch).",
        ),
    ]
    streaming = (table.load_mode or settings.load_mode) == "streaming"
    if streaming:  # batch mode checks every load inline, in its own merge script
        specs.append(
            dg.AssetCheckSpec(
                NO_DUPLICATES,
                asset=key,
                description="No change is in the changelog twice (yesterday's and today's partitions).",
            )
        )

    @dg.multi_asset_check(name=f"check_{'__'.join(key.path)}", specs=specs, can_subset=True)
    def table_checks(
        context: dg.AssetCheckExecutionContext,
        landing: LandingResource,
        bigquery: BigQueryCdcResource,
        mysql: MySqlSourceResource,
    ) -> Any:
        targets = TableTargets(bigquery.client(), table)
        selected = {check.name for check in context.selected_asset_check_keys}
        if ROW_COUNT in selected:
            yield row_count_result(cluster, table, landing, targets, mysql)
        if FILES_LOADED in selected:
            yield files_loaded_result(table, landing, targets, settings.load_grace_seconds)
        if CONTENT in selected:
            yield content_result(cluster, table, landing, targets, mysql, settings)
        if streaming and NO_DUPLICATES in selected:
            yield recent_duplicates_result(table, targets)

    return table_checks
