"""One writer per table: which Dagster runs hold which tables, and a load run's wait for the runs before it.

A table may have two runs at a time: the one loading it and the next, launched while the first loads so that its
worker's start-up (seconds: a new process loading the code location) overlaps that load. A run holds a table from
its creation until it has materialized that table (its load step reports each table as soon as it is loaded, and
goes on with its others) or has ended. The next run loads a table as soon as no earlier run holds it (a streaming
table: all that landed meanwhile, as its loader reads every file not read yet): a table is handed over, not the
whole run. The SQS sensor launches a run only for tables held by fewer than RUNS_PER_TABLE runs (docs/design.md,
"Sensor").

A run writes the assets it selects (loads, backfills) or, for a `resnapshot_table` run (an op job that selects no
asset, so it holds its table until it ends), the table named in its run config: a re-snapshot and a load of the
same table never append at once."""

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


class Materialized:
    """The assets each run has materialized so far, read incrementally: a run's materializations only grow, so each
    read fetches only the events after the cursor of the last one (a waiting run polls this several times a
    second, and a run's materialization events carry each table's metadata). One per reader: a run's hand-over, or
    the sensor across its ticks."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str | None, set[dg.AssetKey]]] = {}

    def of(self, instance: dg.DagsterInstance, run_id: str) -> set[dg.AssetKey]:
        cursor, assets = self._seen.get(run_id, (None, set()))
        while True:
            result = instance.get_records_for_run(
                run_id, cursor=cursor, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=500
            )
            assets.update(
                r.event_log_entry.dagster_event.asset_key
                for r in result.records
                if r.event_log_entry.dagster_event and r.event_log_entry.dagster_event.asset_key
            )
            cursor = result.cursor
            if not result.has_more:
                break
        self._seen[run_id] = (cursor, assets)
        return set(assets)

    def keep_only(self, run_ids: Collection[str]) -> None:
        """Forget runs no longer active."""
        self._seen = {run: seen for run, seen in self._seen.items() if run in run_ids}


def held_assets(
    instance: dg.DagsterInstance,
    record: dg.RunRecord,
    names: Mapping[str, dg.AssetKey],
    materialized: Materialized | None = None,
) -> set[dg.AssetKey]:
    """The tables an active run still holds: those it writes and has not materialized yet."""
    written = written_assets(record.dagster_run, names)
    if not written or record.dagster_run.status != dg.DagsterRunStatus.STARTED:
        return written  # a run not started has materialized nothing
    return written - (materialized or Materialized()).of(instance, record.dagster_run.run_id)


def runs_per_asset(
    instance: dg.DagsterInstance,
    now: float,
    names: Mapping[str, dg.AssetKey],
    materialized: Materialized | None = None,
) -> Counter[dg.AssetKey]:
    """How many active runs (loads, backfills, re-snapshots) hold each asset."""
    counts: Counter[dg.AssetKey] = Counter()
    records = active_runs(instance, now)
    if materialized is not None:
        materialized.keep_only({record.dagster_run.run_id for record in records})
    for record in records:
        counts.update(held_assets(instance, record, names, materialized))
    return counts


def earlier_holders(
    instance: dg.DagsterInstance,
    mine: dg.RunRecord,
    assets: Collection[dg.AssetKey],
    now: float,
    names: Mapping[str, dg.AssetKey],
    materialized: Materialized | None = None,
) -> dict[dg.AssetKey, list[str]]:
    """Of `assets`, those held by active runs created before the run `mine`, with the ids of those runs."""
    wanted = set(assets)
    order = (mine.create_timestamp, mine.dagster_run.run_id)
    holders: dict[dg.AssetKey, list[str]] = {}
    for record in active_runs(instance, now):
        if (record.create_timestamp, record.dagster_run.run_id) >= order:
            continue
        if wanted & written_assets(record.dagster_run, names):
            for asset in wanted & held_assets(instance, record, names, materialized):
                holders.setdefault(asset, []).append(record.dagster_run.run_id)
    return holders


class HandOver:
    """A run's wait for its tables: which of them no earlier run holds any more (polled), logging each earlier
    run it waits for once."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        run_id: str,
        names: Mapping[str, dg.AssetKey],
        log: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._instance = instance
        self._mine = instance.get_run_record_by_id(run_id)
        self._names = names
        self._log = log
        self._clock = clock
        self._shown: set[str] = set()
        self._materialized = Materialized()

    def free(self, assets: Collection[dg.AssetKey]) -> set[dg.AssetKey]:
        """Those of `assets` that no earlier active run holds."""
        if self._mine is None or not assets:
            return set(assets)
        holders = earlier_holders(
            self._instance, self._mine, assets, self._clock(), self._names, self._materialized
        )
        new = sorted({run for runs in holders.values() for run in runs} - self._shown)
        if new:
            self._log(
                f"waiting for run(s) {', '.join(new)} to finish writing the same table(s) (one writer per table)"
            )
            self._shown.update(new)
        return set(assets) - set(holders)


def wait_for_earlier_writers(
    instance: dg.DagsterInstance,
    run_id: str,
    assets: Collection[dg.AssetKey],
    log: Callable[[str], None],
    names: Mapping[str, dg.AssetKey],
    clock: Callable[[], float] = time.time,
) -> float:
    """Block until no earlier active run holds one of `assets`; the seconds waited."""
    started = clock()
    hand_over = HandOver(instance, run_id, names, log, clock)
    while len(hand_over.free(assets)) < len(set(assets)):
        time.sleep(POLL_SECONDS)
    return clock() - started
