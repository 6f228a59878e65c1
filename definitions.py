"""The Dagster code location (workspace.yaml): assets, checks, jobs, schedules and sensors, all built from the table
mappings (CDC_MAPPINGS_DIR) and the settings of the process that loads it."""

import dagster as dg

from cdc.mappings import load_mappings
from cdc.settings import Settings
from cdc_assets.checks import build_table_checks
from cdc_assets.lineage import bigquery_asset_key, landing_asset_specs, source_asset_specs
from cdc_assets.resnapshot import HEAVY_RUN_TAG, build_resnapshot_job
from cdc_assets.resources import build_alert_webhook, build_resources
from cdc_assets.stream_run import build_stream_job
from cdc_assets.tables import build_table_assets
from sensors import shared_instance
from sensors.alerts import (
    alert_failed_checks,
    alert_failed_runs,
    build_dead_letter_alert_sensor,
)
from sensors.resnapshot_requests import build_resnapshot_request_sensor
from sensors.sqs_sensor import build_sqs_sensor
from sensors.stream_runs import build_stream_run_sensor
from sensors.table_checks_rotation import build_table_checks_sensor

TABLE_CHECKS_JOB = "table_checks"
shared_instance.install()  # sensor ticks reuse this process's Dagster instance


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.load()
    mappings = load_mappings(settings.mappings_dir)
    tables = list(mappings.tables())
    checks = [build_table_checks(cluster, table, settings) for cluster, table in tables]
    table_checks = dg.define_asset_job(
        TABLE_CHECKS_JOB,
        selection=dg.AssetSelection.checks(*checks),
        description="Row counts and contents (source vs BigQuery) and landed-vs-loaded files of every table (or of "
        "the tables the table_checks_rotation sensor picks); in streaming mode also the changelog's recent duplicates.",
        tags={HEAVY_RUN_TAG: "true"},
    )
    stream_job = build_stream_job(mappings, settings)
    return dg.Definitions(
        assets=[
            *source_asset_specs(mappings),
            *landing_asset_specs(mappings),
            build_table_assets(tables, settings),
        ],
        asset_checks=checks,
        jobs=[table_checks, build_resnapshot_job(mappings, settings), stream_job],
        sensors=[
            build_table_checks_sensor(table_checks, checks, settings.table_checks_cycle_minutes),
            build_sqs_sensor(mappings, [bigquery_asset_key(t) for _, t in tables], settings),
            build_stream_run_sensor(stream_job, mappings, settings),
            alert_failed_checks,
            alert_failed_runs,
            build_dead_letter_alert_sensor(),
            build_resnapshot_request_sensor(mappings),
        ],
        resources={**build_resources(settings), "alerts": build_alert_webhook()},
        executor=dg.in_process_executor,  # a load is I/O-bound; a process per step costs ~1 s on 2 cores
    )


@dg.definitions
def defs() -> dg.Definitions:
    """What workspace.yaml loads: built when the code location loads, not when this module is imported."""
    return build_definitions()
