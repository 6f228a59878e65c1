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
same table never append at once.

A standing stream run (`cdc_assets.stream_run`) holds the tables its run config names for its whole life, except
those it has released to a later run: it logs an observation of the table naming that run once it no longer loads
the table, and loads it again only after that run has materialized it or ended. A stream run whose heartbeat stopped
(its worker died) holds nothing."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

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
STREAM_JOB = "stream_landed_files"
STREAM_OP = "stream_tables"
RELEASED_TO = "released_to"  # metadata of a stream run's observation that hands a table to a later run
HEARTBEAT_KEY = (
    "cdc/stream-heartbeat/"  # + run id: a stream run's last sign of life (instance key-value store)
)
HEARTBEAT_STALE_S = 30.0


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
    ops = run.run_config.get("ops", {}) if isinstance(run.run_config, dict) else {}
    if run.job_name == RESNAPSHOT_JOB:
        table = (ops.get(RESNAPSHOT_OP) or {}).get("config", {}).get("table")
        if isinstance(table, str) and table in names:
            assets.add(names[table])
    if run.job_name == STREAM_JOB:
        tables = (ops.get(STREAM_OP) or {}).get("config", {}).get("tables") or []
        assets.update(names[table] for table in tables if isinstance(table, str) and table in names)
    return assets


def is_stream_run(run: dg.DagsterRun) -> bool:
    return run.job_name == STREAM_JOB


def active_runs(
    instance: dg.DagsterInstance, now: float, created_after: dt.datetime | None = None
) -> list[dg.RunRecord]:
    """Runs queued or in progress: started stream runs whatever their age (their heartbeat says whether they live:
    `stream_run_alive`), and other runs - a stream run not started yet too - younger than ACTIVE_RUN_MAX_AGE_S.
    With `created_after`, only those created after it (a stream run asks every second for the runs around and after
    its own creation: itself, and seldom more than a next run or a checks run)."""
    after = created_after.astimezone(dt.UTC) if created_after is not None else None
    records = instance.get_run_records(
        dg.RunsFilter(statuses=ACTIVE_RUN_STATUSES, created_after=after), limit=200
    )
    return [
        r
        for r in records
        if (is_stream_run(r.dagster_run) and r.dagster_run.status == dg.DagsterRunStatus.STARTED)
        or now - r.create_timestamp.timestamp() < ACTIVE_RUN_MAX_AGE_S
    ]


class _RunEvents:
    """What the events of one type of each run say, read incrementally: a run's events only grow, so each read
    fetches only the events after the cursor of the last one (a waiting run polls this several times a second).
    One per reader: a run's hand-over, or the sensor across its ticks."""

    event_type = dg.DagsterEventType.ASSET_MATERIALIZATION

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str | None, set[Any]]] = {}

    def _item(self, event: dg.DagsterEvent) -> Any:
        return event.asset_key

    def _read(self, instance: dg.DagsterInstance, run_id: str) -> set[Any]:
        cursor, items = self._seen.get(run_id, (None, set()))
        while True:
            result = instance.get_records_for_run(run_id, cursor=cursor, of_type=self.event_type, limit=500)
            events = [r.event_log_entry.dagster_event for r in result.records]
            items.update(
                item for event in events if event is not None and (item := self._item(event)) is not None
            )
            cursor = result.cursor
            if not result.has_more:
                break
        self._seen[run_id] = (cursor, items)
        return set(items)

    def keep_only(self, run_ids: Collection[str]) -> None:
        """Forget runs no longer active."""
        self._seen = {run: seen for run, seen in self._seen.items() if run in run_ids}


class Materialized(_RunEvents):
    """The assets each run has materialized so far."""

    def of(self, instance: dg.DagsterInstance, run_id: str) -> set[dg.AssetKey]:
        return self._read(instance, run_id)


class Released(_RunEvents):
    """The (asset, later run id) pairs each stream run has released."""

    event_type = dg.DagsterEventType.ASSET_OBSERVATION

    def _item(self, event: dg.DagsterEvent) -> Any:
        data = event.event_specific_data
        observation = getattr(data, "asset_observation", None)
        entry = observation.metadata.get(RELEASED_TO) if observation is not None else None
        return (event.asset_key, entry.value) if entry is not None else None

    def to(self, instance: dg.DagsterInstance, run_id: str, later_run_id: str) -> set[dg.AssetKey]:
        """The assets stream run `run_id` has released to `later_run_id`."""
        return {asset for asset, later in self._read(instance, run_id) if later == later_run_id}


def stream_run_alive(instance: dg.DagsterInstance, record: dg.RunRecord, now: float) -> bool:
    """A stream run not started yet, or started and beating (its first beat is its first act)."""
    if record.dagster_run.status != dg.DagsterRunStatus.STARTED:
        return True
    started = record.start_time or record.create_timestamp.timestamp()
    key = HEARTBEAT_KEY + record.dagster_run.run_id
    value = instance.run_storage.get_cursor_values({key}).get(key)
    try:
        beat = float(value) if value is not None else started
    except ValueError:
        beat = started
    return now - beat < HEARTBEAT_STALE_S


def held_assets(
    instance: dg.DagsterInstance,
    record: dg.RunRecord,
    names: Mapping[str, dg.AssetKey],
    materialized: Materialized | None = None,
    released: Released | None = None,
    asked_by: str | None = None,
) -> set[dg.AssetKey]:
    """The tables an active run still holds: those it writes and has not materialized yet; for a stream run, those
    it writes and has not released to the run `asked_by` (none once its heartbeat stopped)."""
    written = written_assets(record.dagster_run, names)
    if is_stream_run(record.dagster_run):
        if not written or not stream_run_alive(instance, record, time.time()):
            return set()
        if asked_by is None:
            return written
        return written - (released or Released()).to(instance, record.dagster_run.run_id, asked_by)
    if not written or record.dagster_run.status != dg.DagsterRunStatus.STARTED:
        return written  # a run not started has materialized nothing
    return written - (materialized or Materialized()).of(instance, record.dagster_run.run_id)


def runs_per_asset(
    instance: dg.DagsterInstance,
    now: float,
    names: Mapping[str, dg.AssetKey],
    materialized: Materialized | None = None,
) -> Counter[dg.AssetKey]:
    """How many active runs (loads, backfills, re-snapshots; not stream runs) hold each asset."""
    counts: Counter[dg.AssetKey] = Counter()
    records = [r for r in active_runs(instance, now) if not is_stream_run(r.dagster_run)]
    if materialized is not None:
        materialized.keep_only({record.dagster_run.run_id for record in records})
    for record in records:
        counts.update(held_assets(instance, record, names, materialized))
    return counts


def earlier_writers(
    instance: dg.DagsterInstance,
    mine: dg.RunRecord,
    assets: Collection[dg.AssetKey],
    now: float,
    names: Mapping[str, dg.AssetKey],
) -> list[dg.RunRecord]:
    """The active runs created before the run `mine` that write any of `assets`, holding them or not."""
    wanted = set(assets)
    order = (mine.create_timestamp, mine.dagster_run.run_id)
    return [
        record
        for record in active_runs(instance, now)
        if (record.create_timestamp, record.dagster_run.run_id) < order
        and wanted & written_assets(record.dagster_run, names)
    ]


def holders_among(
    instance: dg.DagsterInstance,
    runs: list[dg.RunRecord],
    mine: dg.RunRecord,
    assets: Collection[dg.AssetKey],
    names: Mapping[str, dg.AssetKey],
    materialized: Materialized | None = None,
    released: Released | None = None,
) -> dict[dg.AssetKey, list[str]]:
    """Of `assets`, those these runs still hold (against the run `mine`), with the ids of the runs holding each."""
    wanted = set(assets)
    holders: dict[dg.AssetKey, list[str]] = {}
    for record in runs:
        held = held_assets(instance, record, names, materialized, released, mine.dagster_run.run_id)
        for asset in wanted & held:
            holders.setdefault(asset, []).append(record.dagster_run.run_id)
    return holders


def earlier_holders(
    instance: dg.DagsterInstance,
    mine: dg.RunRecord,
    assets: Collection[dg.AssetKey],
    now: float,
    names: Mapping[str, dg.AssetKey],
    materialized: Materialized | None = None,
    released: Released | None = None,
) -> dict[dg.AssetKey, list[str]]:
    """Of `assets`, those held by active runs created before the run `mine`, with the ids of those runs."""
    writers = earlier_writers(instance, mine, assets, now, names)
    return holders_among(instance, writers, mine, assets, names, materialized, released)


def later_holders(
    instance: dg.DagsterInstance,
    mine: dg.RunRecord,
    now: float,
    names: Mapping[str, dg.AssetKey],
    materialized: Materialized | None = None,
    records: list[dg.RunRecord] | None = None,
) -> dict[dg.AssetKey, list[str]]:
    """What a stream run yields: the assets held by active runs created after it (a later stream run's once it has
    started), with the ids of those runs. `records`: the active runs, if the caller has just read them."""
    order = (mine.create_timestamp, mine.dagster_run.run_id)
    holders: dict[dg.AssetKey, list[str]] = {}
    for record in active_runs(instance, now) if records is None else records:
        if (record.create_timestamp, record.dagster_run.run_id) <= order:
            continue
        if is_stream_run(record.dagster_run) and record.dagster_run.status != dg.DagsterRunStatus.STARTED:
            continue
        for asset in held_assets(instance, record, names, materialized):
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
        self._released = Released()
        # assets no earlier run writes any more: for good, since a run created earlier can only end, and a run
        # created later is never earlier (a stream run polls this several times a second for hours)
        self._unwritten: set[dg.AssetKey] = set()

    def free(self, assets: Collection[dg.AssetKey]) -> set[dg.AssetKey]:
        """Those of `assets` that no earlier active run holds."""
        if self._mine is None or not assets or set(assets) <= self._unwritten:
            return set(assets)
        writers = earlier_writers(self._instance, self._mine, assets, self._clock(), self._names)
        if not writers:
            self._unwritten.update(assets)
        holders = holders_among(
            self._instance, writers, self._mine, assets, self._names, self._materialized, self._released
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
