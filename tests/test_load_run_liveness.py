"""A load run whose worker died never blocks loading: the sensor waits only for recent load runs, every load run
carries a maximum runtime for run monitoring, and `cdc dagster start` fails the runs a killed Dagster left in
progress (locally nothing else would: the default run launcher has no worker health check)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData

from cdc.mappings import TableMapping
from cdc_assets.writers import (
    ACTIVE_RUN_MAX_AGE_S,
    RESNAPSHOT_JOB,
    RESNAPSHOT_OP,
    STREAM_JOB,
    HandOver,
    Materialized,
    active_runs,
    table_names,
    wait_for_earlier_writers,
)
from local_stack.dagster import fail_orphaned_runs
from sensors.sqs_sensor import (
    LOAD_RUN_MAX_RUNTIME_S,
    LOAD_RUN_TAG,
    QueuedFiles,
    active_load_run,
    assets_in_flight,
    run_requests,
)


def _add_run(
    instance: dg.DagsterInstance,
    status: dg.DagsterRunStatus,
    tags: dict[str, str],
    assets: frozenset[dg.AssetKey] | None = None,
    job_name: str = "__ASSET_JOB",
    run_config: dict[str, Any] | None = None,
) -> str:
    run = dg.DagsterRun(
        job_name=job_name,
        run_id=str(uuid.uuid4()),
        status=status,
        tags=tags,
        asset_selection=assets,
        run_config=run_config or {},
    )
    instance.add_run(run)
    return run.run_id


HOT, COLD = dg.AssetKey(["bigquery", "game", "hot"]), dg.AssetKey(["bigquery", "game", "cold"])
NAMES = table_names(
    [
        TableMapping(source="game_db.hot", target="game.hot", primary_key=["id"]),
        TableMapping(source="game_db.cold", target="game.cold", primary_key=["id"]),
    ]
)


def _wait_ending_after(
    instance: dg.DagsterInstance, waiting: str, assets: set[dg.AssetKey], ending: str, seconds: float
) -> tuple[float, list[str]]:
    """wait_for_earlier_writers for the run `waiting` while the run `ending` fails after `seconds`: (waited, log)."""
    logged: list[str] = []
    ended = threading.Timer(seconds, lambda: instance.report_run_failed(instance.get_run_by_id(ending)))
    ended.start()
    try:
        return wait_for_earlier_writers(instance, waiting, assets, logged.append, NAMES), logged
    finally:
        ended.join()


def _waiting_for(run_id: str) -> list[str]:
    return [f"waiting for run(s) {run_id} to finish writing the same table(s) (one writer per table)"]


def test_a_table_takes_a_second_run_that_waits_for_the_first_and_no_third() -> None:
    """The sensor holds a table's files only when it has two active runs (one loading, one waiting to follow);
    the second run's step waits until the first has ended; runs of other tables, later runs and dead ones are
    not waited for."""
    with dg.instance_for_test() as instance:
        first = _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT}))
        _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({COLD}))
        assert assets_in_flight(instance, time.time(), NAMES) == set()  # each table may take a next run
        second = _add_run(
            instance, dg.DagsterRunStatus.STARTING, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT, COLD})
        )
        assert assets_in_flight(instance, time.time(), NAMES) == {HOT, COLD}  # both have two: a third waits
        assert wait_for_earlier_writers(instance, first, {HOT}, print, NAMES) < 1  # nothing earlier holds HOT
        waited, logged = _wait_ending_after(instance, second, {HOT}, first, 1.0)
        assert waited >= 0.9 and logged == _waiting_for(first)
        # an earlier run older than any load is taken for dead: it holds nothing
        later = time.time() + ACTIVE_RUN_MAX_AGE_S + 1
        assert wait_for_earlier_writers(instance, second, {COLD}, print, NAMES, clock=lambda: later) == 0


def _report_materialized(instance: dg.DagsterInstance, run_id: str, asset: dg.AssetKey) -> None:
    """The event a load step stores when it has loaded one of its tables."""
    event = DagsterEvent(
        event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
        job_name="__ASSET_JOB",
        event_specific_data=StepMaterializationData(dg.AssetMaterialization(asset_key=asset)),
    )
    instance.report_dagster_event(event, run_id)


def test_a_run_hands_each_table_over_once_it_has_materialized_it() -> None:
    """A run still loading other tables no longer holds a table it has materialized: the next run of that table
    loads it at once, and the sensor may launch another run for it; a table not yet materialized stays held."""
    with dg.instance_for_test() as instance:
        first = _add_run(
            instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT, COLD})
        )
        second = _add_run(
            instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT, COLD})
        )
        assert assets_in_flight(instance, time.time(), NAMES) == {HOT, COLD}
        logged: list[str] = []
        hand_over = HandOver(instance, second, NAMES, logged.append)
        assert hand_over.free([HOT, COLD]) == set() and logged == _waiting_for(first)
        threading.Timer(0.5, _report_materialized, (instance, first, HOT)).start()
        waited = wait_for_earlier_writers(instance, second, {HOT}, print, NAMES)
        assert 0.4 <= waited < 5  # handed over while the first run goes on
        assert instance.get_run_by_id(first).status == dg.DagsterRunStatus.STARTED
        assert hand_over.free([HOT, COLD]) == {HOT}
        assert logged == _waiting_for(first)  # each earlier run named once
        assert assets_in_flight(instance, time.time(), NAMES) == {COLD}  # HOT: only the second run holds it
        # a later run of HOT now waits for the second, which has not materialized it
        third = _add_run(instance, dg.DagsterRunStatus.STARTING, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT}))
        assert HandOver(instance, third, NAMES, print).free([HOT]) == set()


def test_what_a_run_has_materialized_is_read_on_from_the_last_event_seen() -> None:
    """A waiting run polls what earlier runs have materialized several times a second: each read fetches only the
    events after the last one it saw, and still returns every table the run has materialized."""
    with dg.instance_for_test() as instance:
        run = _add_run(
            instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT, COLD})
        )
        fetched: list[int] = []
        read = instance.get_records_for_run

        def counting(*args: Any, **kwargs: Any) -> Any:
            result = read(*args, **kwargs)
            fetched.append(len(result.records))
            return result

        instance.get_records_for_run = counting  # type: ignore[method-assign]
        materialized = Materialized()
        assert materialized.of(instance, run) == set()
        _report_materialized(instance, run, HOT)
        assert materialized.of(instance, run) == {HOT}
        _report_materialized(instance, run, COLD)
        assert materialized.of(instance, run) == {HOT, COLD}
        assert materialized.of(instance, run) == {HOT, COLD}
        assert fetched == [0, 1, 1, 0]  # each event read once
        materialized.keep_only(set())
        assert materialized.of(instance, run) == {HOT, COLD} and fetched[-1] == 2  # forgotten: read again


def _resnapshot_run(instance: dg.DagsterInstance, table: str) -> str:
    config = {"ops": {RESNAPSHOT_OP: {"config": {"table": table}}}}
    return _add_run(instance, dg.DagsterRunStatus.STARTED, {}, job_name=RESNAPSHOT_JOB, run_config=config)


def test_a_resnapshot_is_a_writer_of_the_table_its_config_names() -> None:
    """A re-snapshot selects no asset (an op job): the table its config names (target or source) counts as
    written, so a load run created after it waits for it, and it waits for a load run created before it - the
    two never append the same snapshot rows at once."""
    with dg.instance_for_test() as instance:
        load = _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT}))
        resnapshot = _resnapshot_run(instance, "game_db.hot")  # by its source name
        cold = _resnapshot_run(instance, "game.cold")  # by its target
        _resnapshot_run(instance, "game.unknown")  # names no table: writes none
        assert assets_in_flight(instance, time.time(), NAMES) == {HOT}  # a load + a re-snapshot: two writers
        assert (
            assets_in_flight(instance, time.time(), {}) == set()
        )  # without the names, no re-snapshot counts
        later_load = _add_run(
            instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({COLD})
        )
        waited, logged = _wait_ending_after(instance, resnapshot, {HOT}, load, 0.5)
        assert waited >= 0.4 and logged == _waiting_for(load)
        # a load created after a re-snapshot of its table waits for it
        waited, logged = _wait_ending_after(instance, later_load, {COLD}, cold, 0.5)
        assert waited >= 0.4 and logged == _waiting_for(cold)


def test_the_sensor_waits_only_for_its_own_recent_load_runs() -> None:
    with dg.instance_for_test() as instance:
        _add_run(instance, dg.DagsterRunStatus.STARTED, {"other": "job"})
        _add_run(instance, dg.DagsterRunStatus.SUCCESS, {LOAD_RUN_TAG: "sensor"})
        assert active_load_run(instance, time.time()) is None
        running = _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"})
        assert active_load_run(instance, time.time()) == running
        # a run "in progress" for longer than any load takes is taken for dead: the sensor goes on
        assert active_load_run(instance, time.time() + ACTIVE_RUN_MAX_AGE_S + 1) is None


def test_load_runs_carry_a_maximum_runtime_for_run_monitoring() -> None:
    table = TableMapping(source="game_db.hot", target="game.hot", primary_key=["id"])
    batch = QueuedFiles(
        table, "2026-11-26", {"cdc/game_db/hot/2026/11/26/a.parquet"}, {"m1": "r1"}, {"m1": 1}
    )
    (request,) = run_requests([batch])
    assert request.tags[LOAD_RUN_TAG] == "sensor"
    assert request.tags["dagster/max_runtime"] == str(LOAD_RUN_MAX_RUNTIME_S)
    assert ACTIVE_RUN_MAX_AGE_S < LOAD_RUN_MAX_RUNTIME_S  # the sensor stops waiting before monitoring ends it


def _worker_event(home: Path, run_id: str, pid: int) -> None:
    """An event of run `run_id` written by process `pid` (as its run worker writes RUN_START)."""
    from dagster._core.events import DagsterEvent, EngineEventData

    instance = dg.DagsterInstance.from_config(str(home))
    try:
        event = DagsterEvent(
            event_type_value=dg.DagsterEventType.ENGINE_EVENT.value,
            job_name="__ASSET_JOB",
            message="the run worker started",
            event_specific_data=EngineEventData(),
            pid=pid,
        )
        instance.report_dagster_event(event, run_id=run_id)
    finally:
        instance.dispose()


def test_dagster_start_fails_runs_a_killed_dagster_left_in_progress(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    instance = dg.DagsterInstance.from_config(str(home))
    orphaned = _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"})
    starting = _add_run(instance, dg.DagsterRunStatus.STARTING, {LOAD_RUN_TAG: "sensor"})
    killed = _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"})
    working = _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"})
    finished = _add_run(instance, dg.DagsterRunStatus.SUCCESS, {LOAD_RUN_TAG: "sensor"})
    instance.dispose()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _worker_event(home, killed, gone.pid)  # its worker wrote an event, and is gone
    # while a process of the earlier Dagster is left (a run worker inherits DAGSTER_HOME), the runs it may be
    # running are left alone: its own, and those no worker has written an event of yet
    worker = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        start_new_session=True,
    )
    _worker_event(home, working, worker.pid)
    try:
        time.sleep(0.5)
        notes = fail_orphaned_runs(home)
        started, starting_ = dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING
        assert _statuses(home, orphaned, starting, working) == [started, starting_, started]
        assert f"run {working} left alone: process(es) [{worker.pid}]" in "\n".join(notes)
        # a run whose worker is gone is failed even while another process of that Dagster is left
        assert _statuses(home, killed) == [dg.DagsterRunStatus.FAILURE]
    finally:
        worker.kill()
        worker.wait()
    # once none is left, they are orphans
    fail_orphaned_runs(home)
    assert _statuses(home, orphaned, starting, working) == [dg.DagsterRunStatus.FAILURE] * 3
    assert _statuses(home, finished) == [dg.DagsterRunStatus.SUCCESS]
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        failure = instance.all_logs(orphaned, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert "its run worker is gone" in str(failure[0].message)
    finally:
        instance.dispose()


def _statuses(home: Path, *run_ids: str) -> list[dg.DagsterRunStatus | None]:
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        runs = [instance.get_run_by_id(run_id) for run_id in run_ids]
        return [run.status if run else None for run in runs]
    finally:
        instance.dispose()


def test_a_started_stream_run_stays_active_past_any_load_s_age_a_queued_one_does_not() -> None:
    """A stream run lives for many minutes: its heartbeat, not its age, says whether it holds its tables. One that
    never started is dropped like any run after ACTIVE_RUN_MAX_AGE_S (else the keeper would wait for it forever)."""
    with dg.instance_for_test() as instance:
        started = _add_run(instance, dg.DagsterRunStatus.STARTED, {}, job_name=STREAM_JOB)
        queued = _add_run(instance, dg.DagsterRunStatus.STARTING, {}, job_name=STREAM_JOB)
        loading = _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"})
        now = time.time()
        assert {r.dagster_run.run_id for r in active_runs(instance, now)} == {started, queued, loading}
        later = now + ACTIVE_RUN_MAX_AGE_S + 1
        assert {r.dagster_run.run_id for r in active_runs(instance, later)} == {started}


def test_a_hand_over_stops_reading_the_runs_once_no_earlier_run_writes_its_tables() -> None:
    """A stream run asks whether its tables are free several times a second for hours: once no run created before it
    writes them any more (those can only end, and a run created later is never earlier), it asks the run storage no
    more. While an earlier run writes one of them, every call reads the runs again."""
    with dg.instance_for_test() as instance:
        first = _add_run(instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT}))
        second = _add_run(
            instance, dg.DagsterRunStatus.STARTED, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT, COLD})
        )
        reads: list[int] = []
        original = instance.get_run_records

        def counted(*args: Any, **kwargs: Any) -> Any:
            reads.append(1)
            return original(*args, **kwargs)

        instance.get_run_records = counted  # type: ignore[method-assign]
        hand_over = HandOver(instance, second, NAMES, print)
        assert hand_over.free([COLD]) == {COLD}  # no earlier run writes COLD
        assert hand_over.free([HOT, COLD]) == {COLD}  # the first run holds HOT
        asked = len(reads)
        assert hand_over.free([COLD]) == {COLD} and len(reads) == asked  # known free for good
        assert hand_over.free([HOT]) == set() and len(reads) == asked + 1  # still written by an earlier run
        instance.report_run_failed(instance.get_run_by_id(first))  # type: ignore[arg-type]
        assert hand_over.free([HOT, COLD]) == {HOT, COLD}
        asked = len(reads)
        for _ in range(5):
            assert hand_over.free([HOT, COLD]) == {HOT, COLD}
        assert len(reads) == asked
        # a later run waits for this one, whatever this one's hand-over has learnt
        third = _add_run(instance, dg.DagsterRunStatus.STARTING, {LOAD_RUN_TAG: "sensor"}, frozenset({HOT}))
        assert HandOver(instance, third, NAMES, print).free([HOT]) == set()
