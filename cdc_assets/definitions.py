"""The Dagster code location: everything is built from the table mappings (CDC_MAPPINGS_DIR)."""

from __future__ import annotations

import dagster as dg

from cdc.mappings import load_mappings
from cdc_assets.resources import resources_from_env
from cdc_assets.sources import source_asset_specs
from cdc_assets.tables import bigquery_asset_key, landing_asset_specs, table_assets
from sensors.sqs_sensor import build_sqs_sensor


def build_definitions() -> dg.Definitions:
    mappings = load_mappings()
    return dg.Definitions(
        assets=[*source_asset_specs(mappings), *landing_asset_specs(mappings), *table_assets(mappings)],
        sensors=[build_sqs_sensor(mappings, [bigquery_asset_key(t) for _, t in mappings.tables()])],
        resources=resources_from_env(),
        executor=dg.in_process_executor,  # a load is I/O-bound; a process per step costs ~1 s on 2 cores
    )


defs = build_definitions()
