"""The asset factory: per mapped table, its S3 landing prefix (external) and its BigQuery tables (materialized).

Lineage: `mysql/<cluster>/<schema>/<table>` -> `s3_landing/<cluster>/<schema>/<table>` ->
`bigquery/<dataset>/<table>` (current state + changelog), grouped per cluster. The BigQuery asset is
partitioned by UTC day (today included). A run loads the landed files named in its config (what the SQS sensor
sends) exactly once; with none named (a backfill from the UI or CLI) it rebuilds the partition's days from every
file landed on them, atomically, and re-derives the current state (running it twice changes nothing).
"""

import datetime as dt
import math
import os
import statistics
from typing import Any

import dagster as dg
import pyarrow.compute as pc
from pydantic import Field

from capture import layout
from cdc.mappings import ClusterMapping, Mappings, TableMapping
from cdc.progress import Progress
from cdc_assets import quota
from cdc_assets.loader import COMMIT_TS, TableLoader, read_landed
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


class LoadFiles(dg.Config):
    keys: list[str] = Field(
        default_factory=list,
        description="Landed S3 keys to load; empty = every file landed on the partition's days.",
    )
    acknowledge: list[str] = Field(
        default_factory=list,
        description="SQS receipt handles to delete once the files are loaded (set by the sensor).",
    )


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


def landed_keys_for_day(landing: LandingResource, table: TableMapping, day: dt.date) -> list[str]:
    """CDC files in the day's folder, and full-load files written that day."""
    s3 = landing.s3()
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


def _acknowledge(landing: LandingResource, receipts: list[str], context: dg.AssetExecutionContext) -> int:
    """Delete the SQS messages of loaded files. An expired handle is harmless: the message comes back, and its
    rerun finds the batch already merged and only deletes it."""
    done = 0
    sqs = landing.sqs()
    for receipt in receipts:
        try:
            sqs.delete_message(QueueUrl=landing.queue_url, ReceiptHandle=receipt)
            done += 1
        except sqs.exceptions.ReceiptHandleIsInvalid:
            context.log.warning(
                "an SQS receipt handle expired before the load finished; the message will return"
            )
    return done


def _quota_metadata(loader: TableLoader) -> dict[str, Any]:
    """Load jobs used today by this table, and where that projects to by the end of the UTC day."""
    now = dt.datetime.now(dt.UTC)
    used = loader.load_jobs_on(now.date())
    elapsed = (now - now.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
    return {
        "load_jobs_today": used,
        "projected_load_jobs_today": round(used * 86400 / max(elapsed, 600)),
        "load_job_cap_per_table_day": quota.table_cap(),
    }


NO_DUPLICATES = "no_duplicate_changes"


def _duplicate_check(loader: TableLoader) -> dg.AssetCheckResult:
    changes, duplicates = loader.duplicate_changes()
    return dg.AssetCheckResult(
        check_name=NO_DUPLICATES,
        passed=duplicates == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"changes": changes, "duplicated_changes": duplicates, "changelog": loader.changelog},
    )


def build_table_asset(cluster: ClusterMapping, table: TableMapping) -> dg.AssetsDefinition:
    key = bigquery_asset_key(table)

    @dg.asset(
        check_specs=[
            dg.AssetCheckSpec(
                NO_DUPLICATES,
                asset=key,
                blocking=True,
                description="Every change is in the changelog exactly once (by change sequence and Op).",
            )
        ],
        key=key,
        deps=[landing_asset_key(cluster, table)],
        partitions_def=DAILY,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name=cluster.cluster,
        kinds={"bigquery"},
        pool=f"cdc_table_{table.target_dataset}_{table.target_table}",  # one writer per table
        description=(
            f"{table.target} (current state, equal to {table.source}) and {table.target_dataset}."
            f"{table.changelog_table} (every change), loaded exactly once from the landed files."
        ),
        metadata={"source": table.source, "primary_key": ", ".join(table.primary_key) or "(append-only)"},
        freshness_policy=FRESHNESS,
        tags={"cdc/cluster": cluster.cluster},
    )
    def load_table(
        context: dg.AssetExecutionContext,
        config: LoadFiles,
        landing: LandingResource,
        bigquery: BigQueryCdcResource,
    ) -> dg.MaterializeResult:
        keys = list(config.keys)
        rebuild_id = None
        if not keys:  # a backfill (UI or CLI): rebuild the partition's days from every file landed on them
            for partition in context.partition_keys:
                keys += landed_keys_for_day(landing, table, dt.date.fromisoformat(partition))
            rebuild_id = context.run_id
        loader = TableLoader(bigquery.client(), table)
        if not keys:
            context.log.info(f"{table.source}: no landed files for {context.partition_keys}")
            return dg.MaterializeResult(
                metadata={"files": 0, "rows": 0, **_quota_metadata(loader)},
                check_results=[_duplicate_check(loader)],
            )
        sizes: list[int] = []
        unreadable: dict[str, str] = {}
        on_file = None
        if rebuild_id:  # a backfill may read many files: log progress every ~10 % of them
            progress = Progress(f"backfill of {table.source} {context.partition_keys} (files)", len(keys))
            step = max(1, len(keys) // 10)

            def on_file(rows: int) -> None:
                line = progress.advance(1)
                if progress.done % step == 0 or progress.done == len(keys):
                    context.log.info(line)

        versions: dict[str, str] = {}
        data = read_landed(landing.s3(), landing.bucket, keys, sizes, unreadable, on_file, versions)
        for key, reason in unreadable.items():
            context.log.error(f"{reason}; moved to the dead-letter queue, the other files are loaded")
            landing.dead_letter_file(
                key, f"{reason}. Replace or delete the file, then redrive this message or backfill its day"
            )
        keys = [key for key in keys if key not in unreadable]
        if data is None:
            acknowledged = _acknowledge(landing, config.acknowledge, context)
            return dg.MaterializeResult(
                metadata={"files": 0, "rows": 0, "dead_lettered_files": len(unreadable)},
                check_results=[_duplicate_check(loader)],
            )
        result = loader.load(data, keys, rebuild_id=rebuild_id, versions=versions)
        acknowledged = _acknowledge(landing, config.acknowledge, context)
        context.log.info(
            f"{table.source} -> {result.table}: {result.files} file(s), {result.rows} row(s), "
            f"{result.inserted_changes} new change(s), {result.jobs} job(s)"
            + (" (rebuild)" if rebuild_id else "")
            + (" - this file set was loaded before, nothing to do" if result.skipped else "")
        )
        return dg.MaterializeResult(
            metadata={
                "files": result.files,
                "bytes": sum(sizes),
                "rows": result.rows,
                "new_changes": result.inserted_changes,
                **{f"rows_{op}": count for op, count in sorted(result.rows_by_op.items())},
                "bigquery_jobs": result.jobs,
                "load_jobs": result.load_jobs,
                "rebuild": rebuild_id is not None,
                "messages_acknowledged": acknowledged,
                "dead_lettered_files": len(unreadable),
                **_latency_metadata(pc.unique(data[COMMIT_TS]).to_pylist()),
                **_quota_metadata(loader),
            },
            check_results=[_duplicate_check(loader)],
        )

    return load_table


def table_assets(mappings: Mappings) -> list[dg.AssetsDefinition]:
    return [build_table_asset(cluster, table) for cluster, table in mappings.tables()]
