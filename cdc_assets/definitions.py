"""The Dagster code location: everything is built from the table mappings (CDC_MAPPINGS_DIR)."""

from __future__ import annotations

import dagster as dg

from cdc.mappings import load_mappings
from cdc_assets.checks import build_table_checks
from cdc_assets.resnapshot import build_resnapshot_job
from cdc_assets.resources import resources_from_env
from cdc_assets.sources import source_asset_specs
from cdc_assets.tables import bigquery_asset_key, landing_asset_specs, table_assets
from sensors.alerts import (
    alert_failed_checks,
    alert_failed_runs,
    build_dead_letter_alert_sensor,
    webhook_from_env,
)
from sensors.sqs_sensor import build_sqs_sensor

TABLE_CHECKS_CRON = "*/10 * * * *"


def build_definitions() -> dg.Definitions:
    mappings = load_mappings()
    checks = [build_table_checks(cluster, table) for cluster, table in mappings.tables()]
    table_checks = dg.define_asset_job(
        "table_checks",
        selection=dg.AssetSelection.checks(*checks),
        description="Row counts (source vs BigQuery) and landed-vs-loaded files for every table.",
    )
    return dg.Definitions(
        assets=[*source_asset_specs(mappings), *landing_asset_specs(mappings), *table_assets(mappings)],
        asset_checks=checks,
        jobs=[table_checks, build_resnapshot_job(mappings)],
        schedules=[
            dg.ScheduleDefinition(
                job=table_checks,
                cron_schedule=TABLE_CHECKS_CRON,
                default_status=dg.DefaultScheduleStatus.RUNNING,
            )
        ],
        sensors=[
            build_sqs_sensor(mappings, [bigquery_asset_key(t) for _, t in mappings.tables()]),
            alert_failed_checks,
            alert_failed_runs,
            build_dead_letter_alert_sensor(),
        ],
        resources={**resources_from_env(), "alerts": webhook_from_env()},
        executor=dg.in_process_executor,  # a load is I/O-bound; a process per step costs ~1 s on 2 cores
    )


defs = build_definitions()
