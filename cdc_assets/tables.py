"""The asset factory: per mapped table, its S3 landing prefix (external) and its BigQuery tables (materialized).

Lineage: `mysql/<cluster>/<schema>/<table>` -> `s3_landing/<cluster>/<schema>/<table>` ->
`bigquery/<dataset>/<table>` (current state + changelog), grouped per cluster. Every BigQuery asset is
partitioned by UTC day (today included) and has its own materializations, checks and freshness policy.

All of them are materialized by one subsettable loader step (`load_landed_files`): a run loads the tables it
selects in parallel threads (a load is mostly waiting on BigQuery), each table exactly once from the landed files
named in the run config (what the SQS sensor sends). A table with no files named (a backfill from the UI or CLI)
is rebuilt from every file landed on the partition's days, atomically, and its current state re-derived (running
it twice changes nothing). A table that fails does not stop the others: they are materialized and acknowledged,
and the step then fails naming each failed table and its error (its messages are retried, then dead-lettered).
"""

import datetime as dt
import math
import os
import queue
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow.compute as pc
from pydantic import Field

from capture import layout
from cdc.mappings import ClusterMapping, Mappings, TableMapping
from cdc.progress import Progress
from cdc_assets import quota
from cdc_assets.loader import COMMIT_TS, LoadResult, TableLoader, read_landed
from cdc_assets.resources import BigQueryCdcResource, LandingResource
from cdc_assets.sources import source_asset_key

PARTITIONS_START = "CDC_PARTITIONS_START"
DAILY = dg.DailyPartitionsDefinition(
    start_date=os.environ.get(PARTITIONS_START, "2026-01-01"), end_offset=1, timezone="UTC"
)


# A table with changes is loaded within seconds; hours without a load mean a stalled capture or sensor (a table
# with no source changes at all in that window would show as stale too: the window is set for busy tables).
FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=dt.timedelta(minutes=float(os.environ.get("CDC_FRESHNESS_FAIL_MINUTES", "120"))),
    warn_window=dt.timedelta(minutes=float(os.environ.get("CDC_FRESHNESS_WARN_MINUTES", "30"))),
)


LOADER = "load_landed_files"  # the step (op) that materializes every BigQuery table asset
LOADER_POOL = "cdc_loader"  # one slot: one loader run at a time, so one writer per table
MAX_PARALLEL_LOADS = "CDC_MAX_PARALLEL_LOADS"  # tables loaded at once in a run (default 8)


class TableFiles(dg.Config):
    keys: list[str] = Field(default_factory=list, description="Landed S3 keys to load.")
    acknowledge: list[str] = Field(
        default_factory=list,
        description="SQS receipt handles to delete once the files are loaded (set by the sensor).",
    )


class LoadFiles(dg.Config):
    tables: dict[str, TableFiles] = Field(
        default_factory=dict,
        description="Per BigQuery target `dataset.table`: the files to load (set by the SQS sensor). A selected "
        "table not named here is rebuilt from every file landed on the partition's days (a backfill).",
    )


def load_run_config(files: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, Any]:
    """Run config of a load run: per target `dataset.table`, (S3 keys, SQS receipt handles)."""
    tables = {
        target: {"keys": sorted(keys), "acknowledge": sorted(receipts)}
        for target, (keys, receipts) in sorted(files.items())
    }
    return {"ops": {LOADER: {"config": {"tables": tables}}}}


def landing_asset_key(cluster: ClusterMapping, table: TableMapping) -> dg.AssetKey:
    return dg.AssetKey(["s3_landing", cluster.cluster, table.source_schema, table.source_table])


def bigquery_asset_key(table: TableMapping) -> dg.AssetKey:
    return dg.AssetKey(["bigquery", table.target_dataset, table.target_table])


def landing_asset_specs(mappings: Mappings) -> list[dg.AssetSpec]:
    return [
        dg.AssetSpec(
            key=landing_asset_key(cluster, table),
            deps=[source_asset_key(cluster, table)],
            description=f"Parquet change files of {table.source} in the landing bucket (DMS layout).",
            group_name=cluster.cluster,
            kinds={"s3", "parquet"},
        )
        for cluster, table in mappings.tables()
    ]


def landed_keys_for_day(
    landing: LandingResource, table: TableMapping, day: dt.date, s3: Any = None
) -> list[str]:
    """CDC files in the day's folder, and full-load files written that day."""
    s3 = s3 or landing.s3()
    base = layout.table_prefix(landing.prefix, table.source_schema, table.source_table)
    keys: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=landing.bucket, Prefix=f"{base}{day:%Y/%m/%d}/"):
        keys += [item["Key"] for item in page.get("Contents", [])]
    for page in paginator.paginate(Bucket=landing.bucket, Prefix=f"{base}LOAD"):
        keys += [item["Key"] for item in page.get("Contents", []) if item["LastModified"].date() == day]
    return sorted(keys)


def _latency_metadata(commit_times: Any) -> dict[str, float]:
    now = dt.datetime.now(dt.UTC)
    seconds = sorted((now - t).total_seconds() for t in commit_times if t is not None)
    if not seconds:
        return {}
    return {
        "lag_s": round(seconds[0], 3),  # how far behind the source the table is: its newest loaded commit
        "latency_p50_s": round(statistics.median(seconds), 3),
        "latency_p95_s": round(seconds[math.ceil(0.95 * len(seconds)) - 1], 3),  # nearest rank
        "latency_max_s": round(seconds[-1], 3),
    }


def _acknowledge(sqs: Any, queue_url: str, receipts: list[str], log: Any) -> int:
    """Delete the SQS messages of loaded files, ten per call. An expired handle is harmless: the message comes back,
    and its rerun finds the batch already merged and only deletes it."""
    done = 0
    for start in range(0, len(receipts), 10):
        entries = [{"Id": str(n), "ReceiptHandle": r} for n, r in enumerate(receipts[start : start + 10])]
        answer = sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        done += len(answer.get("Successful", []))
        for failed in answer.get("Failed", []):
            log.warning(
                f"SQS did not delete a loaded file's message ({failed.get('Code')}: {failed.get('Message')}); it "
                "will return and its rerun only deletes it"
            )
    return done


def _quota_metadata(load_jobs_today: int) -> dict[str, Any]:
    """Load jobs used today by this table, and where that projects to by the end of the UTC day."""
    now = dt.datetime.now(dt.UTC)
    elapsed = (now - now.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
    return {
        "load_jobs_today": load_jobs_today,
        "projected_load_jobs_today": round(load_jobs_today * 86400 / max(elapsed, 600)),
        "load_job_cap_per_table_day": quota.table_cap(),
    }


NO_DUPLICATES = "no_duplicate_changes"


def _duplicate_check(table: TableMapping, changes: int, duplicates: int, scope: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=bigquery_asset_key(table),
        check_name=NO_DUPLICATES,
        passed=duplicates == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "changes": changes,
            "duplicated_changes": duplicates,
            "scope": scope,
            "changelog": f"{table.target_dataset}.{table.changelog_table if table.primary_key else table.target_table}",
        },
    )


@dataclass
class TableLoad:
    """One table's part of a load run, done in a worker thread: S3 and BigQuery only (SQS, logging and Dagster
    events stay on the step's thread)."""

    table: TableMapping
    keys: list[str]
    receipts: list[str]
    rebuild_id: str | None
    log: Callable[[str, str], None]  # (level, message), shown in the run's log by the step's thread
    result: LoadResult | None = None
    unreadable: dict[str, str] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    commit_times: list[Any] = field(default_factory=list)
    duplicates: tuple[int, int] = (0, 0)  # (changes, duplicated) when no batch was merged
    load_jobs_today: int = 0

    def run(self, landing: LandingResource, s3: Any, bq: Any, partition_keys: Sequence[str]) -> "TableLoad":
        table = self.table
        if not self.keys and self.rebuild_id:  # a backfill: rebuild the partition's days from their files
            for partition in partition_keys:
                self.keys += landed_keys_for_day(landing, table, dt.date.fromisoformat(partition), s3)
        loader = TableLoader(bq, table)
        on_file = None
        if self.rebuild_id and self.keys:  # a backfill may read many files: progress every ~10 % of them
            progress = Progress(f"backfill of {table.source} {list(partition_keys)} (files)", len(self.keys))
            step = max(1, len(self.keys) // 10)

            def on_file(rows: int) -> None:
                line = progress.advance(1)
                if progress.done % step == 0 or progress.done == len(self.keys):
                    self.log("info", line)

        versions: dict[str, str] = {}
        data = None
        if self.keys:
            data = read_landed(s3, landing.bucket, self.keys, self.sizes, self.unreadable, on_file, versions)
        self.keys = [key for key in self.keys if key not in self.unreadable]
        if data is None:
            self.duplicates = loader.duplicate_changes()
            self.load_jobs_today = loader.load_jobs_on(dt.datetime.now(dt.UTC).date())
            return self
        self.commit_times = pc.unique(data[COMMIT_TS]).to_pylist()
        self.result = loader.load(data, self.keys, rebuild_id=self.rebuild_id, versions=versions)
        if self.result.skipped:
            self.load_jobs_today = loader.load_jobs_on(dt.datetime.now(dt.UTC).date())
        else:
            self.load_jobs_today = self.result.load_jobs_today
        return self

    def materialization(self, acknowledged: int) -> dg.MaterializeResult:
        table, result = self.table, self.result
        key = bigquery_asset_key(table)
        if result is None:
            return dg.MaterializeResult(
                asset_key=key,
                metadata={
                    "files": 0,
                    "rows": 0,
                    "dead_lettered_files": len(self.unreadable),
                    "messages_acknowledged": acknowledged,
                    **_quota_metadata(self.load_jobs_today),
                },
                check_results=[_duplicate_check(table, *self.duplicates, scope="whole changelog")],
            )
        if result.skipped:
            check = _duplicate_check(table, 0, 0, scope="batch merged before: nothing added")
        else:
            check = _duplicate_check(
                table, result.batch_changes, result.duplicated_changes, scope="this batch"
            )
        return dg.MaterializeResult(
            asset_key=key,
            metadata={
                "files": result.files,
                "bytes": sum(self.sizes),
                "rows": result.rows,
                "new_changes": result.inserted_changes,
                **{f"rows_{op}": count for op, count in sorted(result.rows_by_op.items())},
                "bigquery_jobs": result.jobs,
                "load_jobs": result.load_jobs,
                "stage_s": result.stage_s,
                "merge_s": result.merge_s,
                "rebuild": self.rebuild_id is not None,
                "messages_acknowledged": acknowledged,
                "dead_lettered_files": len(self.unreadable),
                **_latency_metadata(self.commit_times),
                **_quota_metadata(self.load_jobs_today),
            },
            check_results=[check],
        )

    def summary(self) -> str:
        result = self.result
        if result is None:
            return f"{self.table.source}: no readable landed files"
        return (
            f"{self.table.source} -> {result.table}: {result.files} file(s), {result.rows} row(s), "
            f"{result.inserted_changes} new change(s), {result.jobs} job(s)"
            + (" (rebuild)" if self.rebuild_id else "")
            + (" - this file set was loaded before, nothing to do" if result.skipped else "")
        )


def _parallel_loads() -> int:
    return max(1, int(os.environ.get(MAX_PARALLEL_LOADS, "8")))


def build_table_assets(tables: Sequence[tuple[ClusterMapping, TableMapping]]) -> dg.AssetsDefinition:
    """The BigQuery asset of every mapped table, materialized by one subsettable loader step."""
    by_key = {bigquery_asset_key(table): table for _, table in tables}
    specs = [
        dg.AssetSpec(
            key=bigquery_asset_key(table),
            deps=[landing_asset_key(cluster, table)],
            description=(
                f"{table.target} (current state, equal to {table.source}) and {table.target_dataset}."
                f"{table.changelog_table} (every change), loaded exactly once from the landed files."
            ),
            metadata={"source": table.source, "primary_key": ", ".join(table.primary_key) or "(append-only)"},
            group_name=cluster.cluster,
            kinds={"bigquery"},
            tags={"cdc/cluster": cluster.cluster},
            partitions_def=DAILY,
            freshness_policy=FRESHNESS,
            skippable=True,  # a table that fails to load is not materialized; the others are
        )
        for cluster, table in tables
    ]
    check_specs = [
        dg.AssetCheckSpec(
            NO_DUPLICATES,
            asset=bigquery_asset_key(table),
            blocking=True,
            description="Every change of each load is in the changelog exactly once (by change sequence and Op).",
        )
        for _, table in tables
    ]

    @dg.multi_asset(
        name=LOADER,
        specs=specs,
        check_specs=check_specs,
        can_subset=True,
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=LOADER_POOL,
        description="Loads the landed files of the selected tables into BigQuery, tables in parallel.",
    )
    def load_landed_files(
        context: dg.AssetExecutionContext,
        config: LoadFiles,
        landing: LandingResource,
        bigquery: BigQueryCdcResource,
    ) -> Iterator[dg.MaterializeResult]:
        selected = [by_key[key] for key in sorted(context.selected_asset_keys, key=lambda k: k.path)]
        named = {target for target in config.tables if target not in {t.target for t in selected}}
        if named:
            raise dg.Failure(description=f"run config names tables this run does not select: {sorted(named)}")
        lines: queue.Queue[tuple[str, str]] = queue.Queue()
        # one client each for the run's threads: clients are thread-safe, creating them concurrently is not
        s3, sqs, bq = landing.s3(), landing.sqs(), bigquery.client()
        loads = []
        for table in selected:
            files = config.tables.get(table.target)
            rebuild_id = None if files else context.run.run_id  # not named: a backfill rebuilds its days
            loads.append(
                TableLoad(
                    table,
                    list(files.keys) if files else [],
                    list(files.acknowledge) if files else [],
                    rebuild_id,
                    lambda level, message: lines.put((level, message)),
                )
            )
        failures: list[str] = []

        def drain() -> None:
            while not lines.empty():
                level, message = lines.get()
                getattr(context.log, level)(message)

        with ThreadPoolExecutor(max_workers=min(_parallel_loads(), len(loads)) or 1) as pool:
            pending: dict[Future[TableLoad], TableLoad] = {
                pool.submit(load.run, landing, s3, bq, context.partition_keys): load for load in loads
            }
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    load = pending.pop(future)
                    try:
                        future.result()
                    except Exception as exc:  # this table stops; the others go on
                        failures.append(f"{load.table.target}: {exc}")
                        context.log.error(f"{load.table.source}: {exc}")
                        continue
                    for key, reason in load.unreadable.items():
                        context.log.error(
                            f"{reason}; moved to the dead-letter queue, the other files are loaded"
                        )
                        landing.dead_letter_file(
                            key,
                            f"{reason}. Replace or delete the file, then redrive this message or backfill its day",
                        )
                    acknowledged = _acknowledge(sqs, landing.queue_url, load.receipts, context.log)
                    context.log.info(load.summary())
                    asset_key = bigquery_asset_key(load.table)
                    result = load.materialization(acknowledged)
                    if dg.AssetCheckKey(asset_key, NO_DUPLICATES) not in context.selected_asset_check_keys:
                        result = dg.MaterializeResult(asset_key=asset_key, metadata=result.metadata)
                    yield result
        drain()
        if failures:
            raise dg.Failure(
                description=f"{len(failures)} of {len(loads)} table(s) failed to load (the others were loaded): "
                + " | ".join(failures)
            )

    return load_landed_files


def table_assets(mappings: Mappings) -> list[dg.AssetsDefinition]:
    return [build_table_assets(list(mappings.tables()))]
