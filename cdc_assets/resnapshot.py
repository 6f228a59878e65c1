"""The `resnapshot_table` job: a new full load of one table from its source (the capture's own full-load code),
loaded as the table's new snapshot horizon, so whatever the pipeline missed before it is healed. For lost landing
files or a purged binlog; docs/design.md, "Re-snapshot".
"""

import datetime as dt
import time

import dagster as dg
from pydantic import Field

from capture.full_load import full_load
from capture.sink import S3Store
from capture.source_tables import CaptureError
from cdc.landing import ControlDocuments
from cdc.mappings import ClusterMapping, Mappings, TableMapping
from cdc.settings import Settings
from cdc_assets.batch_loader import MergeLoader
from cdc_assets.landed_files import read_landed
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.resources import BigQueryCdcResource, LandingResource, MySqlSourceResource
from cdc_assets.stream_loader import STATE_ROOT, StreamLoader
from cdc_assets.writers import RESNAPSHOT_JOB, RESNAPSHOT_OP, table_names, wait_for_earlier_writers

HEAVY_RUN_TAG = "cdc/heavy"  # runs that read whole tables: the low-latency instance runs few of them at once


class ResnapshotConfig(dg.Config):
    table: str = Field(
        description="The mapped table to re-snapshot: its BigQuery target `dataset.table` or its source "
        "`schema.table`, as written in the mapping file."
    )


def find_table(mappings: Mappings, name: str) -> tuple[ClusterMapping, TableMapping]:
    for cluster, table in mappings.tables():
        if name in (table.target, table.source):
            return cluster, table
    raise dg.Failure(
        description=f"no mapped table is named {name!r}: give a target (dataset.table) or a source "
        f"(schema.table) from the mapping files in {mappings.directory}"
    )


def build_resnapshot_job(mappings: Mappings, settings: Settings) -> dg.JobDefinition:
    names = table_names(t for _, t in mappings.tables())

    @dg.op(
        name=RESNAPSHOT_OP,
        description="New full load of one table from its source, loaded as the table's new snapshot horizon.",
    )
    def resnapshot_from_source(
        context: dg.OpExecutionContext,
        config: ResnapshotConfig,
        landing: LandingResource,
        bigquery: BigQueryCdcResource,
        mysql: MySqlSourceResource,
    ) -> None:
        cluster, table = find_table(mappings, config.table)
        if not table.primary_key:
            raise dg.Failure(
                description=f"{table.source} is append-only: a new full load would add every source row again; "
                "materialize (backfill) the days whose files are missing instead"
            )
        started = time.monotonic()
        store = S3Store(landing.s3(), landing.bucket, landing.prefix)
        context.log.info(f"{table.source}: reading the source table in one consistent snapshot")
        try:
            snapshot = full_load(
                cluster.cluster,
                mysql.connection(cluster),
                store,
                [table],
                keep_previous_loads=True,
                strict=True,
                report_progress=context.log.info,
            )
        except CaptureError as exc:
            raise dg.Failure(
                description=f"{table.source}: {exc}. On MySQL/Aurora captured by DMS, reload the table in its DMS "
                "task instead (aws dms reload-tables) and backfill the day"
            ) from exc
        position = snapshot.position
        keys, rows = snapshot.files[table.source], snapshot.rows[table.source]
        context.log.info(
            f"{table.source}: {rows} row(s) in {len(keys)} file(s) at binlog {position.file}:{position.pos}; "
            "loading them as the table's new snapshot"
        )
        # one writer per table: a load run created before this one (it may read these very files) ends first;
        # the ones created after wait for this run (cdc_assets.writers)
        waited = wait_for_earlier_writers(
            context.instance, context.run_id, {bigquery_asset_key(table)}, context.log.info, names
        )
        if waited >= 1:
            context.log.info(f"{table.source}: the earlier run(s) writing it ended after {waited:.1f} s")
        horizon = position.sequence(0)
        mode = table.load_mode or settings.load_mode
        new_changes, load_jobs = _load_snapshot(mode, table, keys, horizon, landing, bigquery, settings)
        context.log.info(
            f"{table.source}: current state re-derived from the snapshot ({mode} mode, {new_changes} new "
            f"change(s), {time.monotonic() - started:.1f} s)"
        )
        context.log_event(
            dg.AssetMaterialization(
                asset_key=bigquery_asset_key(table),
                partition=dt.datetime.now(dt.UTC).date().isoformat(),
                description=f"re-snapshot of {table.source} at binlog {position.file}:{position.pos}",
                metadata={
                    "resnapshot": True,
                    "rows": rows,
                    "files": len(keys),
                    "new_changes": new_changes,
                    "snapshot_position": f"{position.file}:{position.pos}",
                    "snapshot_horizon": horizon,
                    "load_mode": mode,
                    "load_jobs": load_jobs,
                },
            )
        )

    @dg.job(
        name=RESNAPSHOT_JOB,
        description="Re-snapshot one mapped table from its source (new full load) - for when its landing files "
        "are gone or the capture's binlog position was purged. Config: ops.resnapshot_from_source.config.table.",
        executor_def=dg.in_process_executor,
        tags={HEAVY_RUN_TAG: "true"},
    )
    def resnapshot_table() -> None:
        resnapshot_from_source()

    return resnapshot_table


def _load_snapshot(
    mode: str,
    table: TableMapping,
    keys: list[str],
    horizon: str,
    landing: LandingResource,
    bigquery: BigQueryCdcResource,
    settings: Settings,
) -> tuple[int, int]:
    """Load a re-snapshot's files as the table's new horizon, in its load mode: (new changes, load jobs)."""
    s3 = landing.s3()
    if mode == "streaming":
        control = ControlDocuments(s3, landing.bucket, landing.prefix, root=STATE_ROOT)
        staleness = table.max_staleness_minutes
        loader = StreamLoader(
            bigquery.client(),
            bigquery.write_client(),
            table,
            control,
            settings.max_staleness_minutes if staleness is None else staleness,
        )
        return loader.snapshot(s3, landing.bucket, keys, horizon).inserted_changes, 0
    versions: dict[str, str] = {}
    data = read_landed(s3, landing.bucket, keys, versions=versions)
    assert data is not None  # a snapshot always writes at least one (possibly empty) file
    result = MergeLoader(bigquery.client(), table).load(
        data, keys, snapshot_horizon=horizon, versions=versions
    )
    return result.inserted_changes, result.load_jobs
