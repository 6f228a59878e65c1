"""Dagster runs in tests: ending a run that another run's step is waiting for (one writer per table), a started
stream run."""

from __future__ import annotations

import time

import dagster as dg


def end_once_waited_for(instance: dg.DagsterInstance, earlier: dg.DagsterRun, timeout: float = 60) -> None:
    """Fail `earlier` once another run's step has logged that it waits for it - or after `timeout`, when the
    test's assertion on that wait then fails. (A fixed delay raced a slow step start on a busy machine.)"""
    deadline = time.monotonic() + timeout
    waiting = f"waiting for run(s) {earlier.run_id}"
    while time.monotonic() < deadline:
        others = [run for run in instance.get_runs() if run.run_id != earlier.run_id]
        if any(waiting in event.user_message for run in others for event in instance.all_logs(run.run_id)):
            break
        time.sleep(0.1)
    instance.report_run_failed(instance.get_run_by_id(earlier.run_id))


def add_started_stream_run(
    instance: dg.DagsterInstance, run_id: str, tables: list[str], minutes: float
) -> None:
    """A stream run of `tables` recorded as started (its worker, if any, is the test's), as the keeper requests it."""
    from cdc_assets.stream_run import stream_run_config
    from cdc_assets.writers import STREAM_JOB

    instance.add_run(
        dg.DagsterRun(
            job_name=STREAM_JOB,
            run_id=run_id,
            status=dg.DagsterRunStatus.STARTED,
            run_config=stream_run_config(tables, minutes),
        )
    )
