"""The Dagster code location: everything is built from the table mappings (CDC_MAPPINGS_DIR)."""

from __future__ import annotations

import dagster as dg

from cdc.mappings import load_mappings
from cdc_assets.resources import resources_from_env
from cdc_assets.sources import source_asset_specs
from cdc_assets.tables import landing_asset_specs, table_assets


def build_definitions() -> dg.Definitions:
    mappings = load_mappings()
    return dg.Definitions(
        assets=[*source_asset_specs(mappings), *landing_asset_specs(mappings), *table_assets(mappings)],
        resources=resources_from_env(),
    )


defs = build_definitions()
