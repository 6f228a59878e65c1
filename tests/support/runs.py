"""Dagster runs in tests: ending a run that another run's step is waiting for (one writer per table)."""

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
