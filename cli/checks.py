"""`cdc checks`: the table_checks job (source vs BigQuery, landed files, and in streaming mode the changelog's
duplicates) for every table, run here and recorded in the Dagster instance (the table_checks_rotation sensor runs it
a few tables a minute)."""

from __future__ import annotations

import click

from cli.common import config
from definitions import TABLE_CHECKS_JOB, build_definitions
from local_stack.dagster import open_instance


@click.command("checks")
def command() -> None:
    """Run every table's checks now (the table_checks job) and print each result; exit 1 if one fails."""
    current = config()
    result = (
        build_definitions(current)
        .resolve_job_def(TABLE_CHECKS_JOB)
        .execute_in_process(instance=open_instance(current), raise_on_error=False)
    )
    failed = 0
    for evaluation in sorted(
        result.get_asset_check_evaluations(), key=lambda e: (e.asset_key.path, e.check_name)
    ):
        failed += not evaluation.passed
        mark = "ok" if evaluation.passed else f"FAIL ({evaluation.severity.value})"
        click.echo(
            f"{evaluation.asset_key.to_user_string():<40} {evaluation.check_name:<26} {mark}  {evaluation.description or ''}"
        )
    click.echo(f"run {result.run_id}: {failed} failed check(s)")
    if failed or not result.success:
        raise SystemExit(1)
