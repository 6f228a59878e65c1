"""One writer per table: which Dagster runs hold which tables, and a load run's wait for the runs before it.

A table may have two runs at a time: the one loading it and the next, launched while the first loads so that its
worker's start-up (seconds: a new process loading the code location) overlaps that load. The next run's step waits
until every earlier run that selects one of its tables has ended, then loads (a streaming table: all that landed
meanwhile, as its loader reads every file not read yet). The SQS sensor launches a run only for tables
with fewer than RUNS_PER_TABLE runs (docs/design.md, "Sensor").

A run writes the assets it selects (loads, backfills) or, for a `resnapshot_table` run (an op job that selects no
asset), the table named in its run config: a re-snapshot and a load of the same table never append at once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping

import dagster as dg

from cdc.mappings import TableMapping
from cdc_assets.lineage import bigquery_asset_key

RUNS_PER_TABLE = 2  # the run loading a table and the one waiting to follow it
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
# an older "active" run is taken for dead (its worker gone): its tables are free again
ACTIVE_RUN_MAX_AGE_S = 600
POLL_SECONDS = 0.25
RESNAPSHOT_JOB = "resnapshot_table"
RESNAPSHOT_OP = "resnapshot_from_source"


def table_names(tables: Iterable[TableMapping]) -> dict[str, dg.AssetKey]:
    """Each table's asset by the names a re-snapshot's config may give it: target and source (first wins)."""
    names: dict[str, dg.AssetKey] = {}
    for table in tables:
        for name in (table.target, table.source):
            names.setdefault(name, bigquery_asset_key(table))
    return names


def written_assets(run: dg.DagsterRun, names: Mapping[str, dg.AssetKey]) -> set[dg.AssetKey]:
    """The tables a run writes: the assets it selects, or the table a re-snapshot's run config names."""
    assets = set(run.asset_selection or ())
    if run.job_name == RESNAPSHOT_JOB:
        ops = run.run_config.get("ops", {}) if isinstance(run.run_config, dict) else {}
        table = (ops.get(RESNAPSHOT_OP) or {}).get("config", {}).get("table")
        if isinstance(table, str) and table in names:
            assets.add(names[table])
    return assets


def active_runs(instance: dg.DagsterInstance, now: float) -> list[dg.RunRecord]:
    """Runs queued or in progress, younger than ACTIVE_RUN_MAX_AGE_S."""
    records = instance.get_run_records(dg.RunsFilter(statuses=ACTIVE_RUN_STATUSES), limit=200)
    return [r for r in records if now - r.create_timestamp.timestamp() < ACTIVE_RUN_MAX_AGE_S]


def runs_per_asset(
    instance: dg.DagsterInstance, now: float, names: Mapping[str, dg.AssetKey]
) -> Counter[dg.AssetKey]:
    """How many active runs (loads, backfills, re-snapshots) write each asset."""
    counts: Counter[dg.AssetKey] = Counter()
    for record in active_runs(instance, now):
        counts.update(written_assets(record.dagster_run, names))
    return counts


def earlier_writers(
    instance: dg.DagsterInstance,
    mine: dg.RunRecord,
    assets: Collection[dg.AssetKey],
    now: float,
    names: Mapping[str, dg.AssetKey],
) -> list[dg.RunRecord]:
    """Active runs created before the run `mine` that write one of `assets`."""
    wanted = set(assets)
    order = (mine.create_timestamp, mine.dagster_run.run_id)
    return [
        r
        for r in active_runs(instance, now)
        if (r.create_timestamp, r.dagster_run.run_id) < order
        and wanted & written_assets(r.dagster_run, names)
    ]


def wait_for_earlier_writers(
    instance: dg.DagsterInstance,
    run_id: str,
    assets: Collection[dg.AssetKey],
    log: Callable[[str], None],
    names: Mapping[str, dg.AssetKey],
    clock: Callable[[], float] = time.time,
) -> float:
    """Block until no earlier active run writes one of `assets`; the seconds waited."""
    started = clock()
    mine = instance.get_run_record_by_id(run_id)
    if mine is None:
        return 0.0
    shown: set[str] = set()
    while True:
        before = earlier_writers(instance, mine, assets, clock(), names)
        if not before:
            return clock() - started
        new = [r.dagster_run.run_id for r in before if r.dagster_run.run_id not in shown]
        if new:
            log(
                f"waiting for run(s) {', '.join(new)} to finish writing the same table(s) (one writer per table)"
            )
            shown.update(new)
        time.sleep(POLL_SECONDS)
