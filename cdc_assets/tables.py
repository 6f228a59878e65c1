"""The asset factory: one BigQuery asset per mapped table (current state + changelog), all materialized by one
subsettable loader step, `load_landed_files` (its body: `cdc_assets.load_run`).

Every BigQuery asset is partitioned by UTC day (today included) and has its own materializations, checks and
freshness policy; a run loads the tables it selects, each exactly once, from the files its config names (what the
SQS sensor sends), or rebuilds a table's days when none are named (a backfill). Runs of different tables run at
once; the sensor never puts a table in a run while another run holds it (one writer per table).
"""

import datetime as dt
from collections.abc import Iterator, Sequence

import dagster as dg

from cdc.mappings import ClusterMapping, TableMapping
from cdc.settings import Settings
from cdc_assets.lineage import bigquery_asset_key, landing_asset_key
from cdc_assets.load_run import LOADER, NO_DUPLICATES, LoadFilesConfig, LoadStepSettings, load_selected_tables
from cdc_assets.resources import BigQueryCdcResource, LandingResource
from cdc_assets.writers import table_names


def daily_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=settings.partitions_start, end_offset=1, timezone="UTC")


def freshness_policy(settings: Settings) -> dg.FreshnessPolicy:
    """A table with changes is loaded within seconds; hours without a load mean a stalled capture or sensor (a table
    with no source changes at all in that window would show as stale too: the window is set for busy tables)."""
    return dg.FreshnessPolicy.time_window(
        fail_window=dt.timedelta(minutes=settings.freshness_fail_minutes),
        warn_window=dt.timedelta(minutes=settings.freshness_warn_minutes),
    )


def build_table_assets(
    tables: Sequence[tuple[ClusterMapping, TableMapping]], settings: Settings
) -> dg.AssetsDefinition:
    """The BigQuery asset of every mapped table, materialized by one subsettable loader step."""
    by_key = {bigquery_asset_key(table): table for _, table in tables}
    names = table_names(by_key.values())  # a re-snapshot's table by the names its config may give
    partitions = daily_partitions(settings)
    freshness = freshness_policy(settings)
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
            partitions_def=partitions,
            freshness_policy=freshness,
            skippable=True,  # a table that fails to load is not materialized; the others are
        )
        for cluster, table in tables
    ]
    step_settings = LoadStepSettings(
        settings.max_parallel_loads,
        settings.max_load_jobs_per_table_per_day,
        settings.load_mode,
        settings.max_staleness_minutes,
    )
    check_specs = [  # batch mode checks each load inline; streaming mode in the table_checks job (checks.py)
        dg.AssetCheckSpec(
            NO_DUPLICATES,
            asset=bigquery_asset_key(table),
            blocking=True,
            description="Every change of each load is in the changelog exactly once (by change sequence and Op).",
        )
        for _, table in tables
        if step_settings.mode_of(table) == "batch"
    ]

    @dg.multi_asset(
        name=LOADER,
        specs=specs,
        check_specs=check_specs,
        can_subset=True,
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        description="Loads the landed files of the selected tables into BigQuery, tables in parallel.",
    )
    def load_landed_files(
        context: dg.AssetExecutionContext,
        config: LoadFilesConfig,
        landing: LandingResource,
        bigquery: BigQueryCdcResource,
    ) -> Iterator[dg.MaterializeResult]:
        yield from load_selected_tables(context, config, landing, bigquery, by_key, step_settings, names)

    return load_landed_files
