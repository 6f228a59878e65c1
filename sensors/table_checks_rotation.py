"""`table_checks_rotation`: the table checks a few tables at a time. One run a minute checks the next group of tables,
so every table is checked once per cycle (`CDC_TABLE_CHECKS_CYCLE_MINUTES`) and the checks' reads of the sources and
of BigQuery stay even over time instead of all tables at once beside the load runs. A group waits while a checks run
is still in progress (the rotation then slows down, it never skips a table); the cursor counts the groups launched.
docs/design.md, "Checks"."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence

import dagster as dg

from cdc_assets.writers import ACTIVE_RUN_STATUSES

ROTATION_TAG = "cdc/checks_group"  # "3/10": the group a run checks, of how many
STALE_RUN_SECONDS = 3600  # a checks run started longer ago than this no longer holds the rotation back
IN_PROGRESS = [*ACTIVE_RUN_STATUSES, dg.DagsterRunStatus.CANCELING]  # a canceling run still reads the sources


def table_check_groups(
    checks: Sequence[dg.AssetChecksDefinition], cycle_minutes: int
) -> list[list[dg.AssetCheckKey]]:
    """The tables' checks in up to `cycle_minutes` groups of whole tables, each table in one group: tables sorted
    by asset key and dealt round-robin, so a cluster's tables are spread over the cycle."""
    tables = sorted((sorted(c.check_keys, key=str) for c in checks), key=lambda keys: keys[0].asset_key)
    count = min(cycle_minutes, len(tables))
    return [[key for keys in tables[group::count] for key in keys] for group in range(count)]


def build_table_checks_sensor(
    job: dg.UnresolvedAssetJobDefinition, checks: Sequence[dg.AssetChecksDefinition], cycle_minutes: int
) -> dg.SensorDefinition:
    groups = table_check_groups(checks, cycle_minutes)

    @dg.sensor(
        name="table_checks_rotation",
        job=job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Runs {job.name} for the next of {len(groups)} groups of tables each minute: every table's "
        f"checks once per {cycle_minutes} minutes.",
    )
    def table_checks_rotation(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        if not groups:
            return dg.SkipReason("no table is mapped")
        running = context.instance.get_run_records(
            dg.RunsFilter(
                job_name=job.name,
                statuses=IN_PROGRESS,
                created_after=dt.datetime.fromtimestamp(time.time() - STALE_RUN_SECONDS, dt.UTC),
            ),
            limit=1,
        )
        if running:
            run = running[0].dagster_run
            return dg.SkipReason(
                f"{job.name} run {run.run_id} ({run.tags.get(ROTATION_TAG, 'all tables')}) is still in progress: "
                "the next group starts when it ends"
            )
        launched = int(context.cursor or 0)
        group = launched % len(groups)
        context.update_cursor(str(launched + 1))
        return dg.RunRequest(
            run_key=f"checks-{launched}",
            asset_check_keys=groups[group],
            tags={ROTATION_TAG: f"{group + 1}/{len(groups)}"},
        )

    return table_checks_rotation
