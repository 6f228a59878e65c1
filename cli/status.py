"""`cdc status`: per mapped table, what an analyst needs to manage it (cdc_assets.status owns the report)."""

from __future__ import annotations

import json
from typing import Any

import click

from cdc.clients import bigquery_client_from
from cdc_assets import status as table_status
from cdc_assets.checks import FILES_LOADED, ROW_COUNT
from cdc_assets.content_check import CONTENT
from cdc_assets.load_run import NO_DUPLICATES
from cdc_assets.resources import LandingResource
from cli.common import config, platform_mappings
from local_stack.dagster import open_instance

CHECK_LABELS = {NO_DUPLICATES: "dup", ROW_COUNT: "rows", CONTENT: "content", FILES_LOADED: "files"}


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--table", default=None, help="Only this table (its target or source name).")
def command(as_json: bool, table: str | None) -> None:
    """Per mapped table: cluster, last source commit loaded, lag, rows changed today by op, last check results,
    files waiting to load and dead-letter messages."""
    current = config()
    loaded = platform_mappings()
    if table and not any(table in (t.target, t.source) for _, t in loaded.tables()):
        raise click.ClickException(f"no mapped table is named {table!r} (use its target or source name)")
    landing = LandingResource.from_settings(current)
    statuses, unmapped = table_status.collect(
        loaded, landing, bigquery_client_from(current), open_instance(current), only=table
    )
    if as_json:
        report = {"tables": [s.to_json() for s in statuses], "dead_letters_unmapped": unmapped}
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{'table':<32} {'cluster':<18} {'last commit loaded (UTC)':<27} {'lag':>9} {'today I/U/D':>15} "
        f"{'waiting':>7} {'dead':>5}  checks"
    )
    for s in statuses:
        last = (s.last_commit_loaded or "-")[:26].replace("T", " ")
        lag = f"{s.lag_s:.1f} s" if s.lag_s is not None else "-"
        today = "/".join(str(s.rows_today.get(op, 0)) for op in "IUD")
        click.echo(
            f"{s.target:<32} {s.cluster:<18} {last:<27} {lag:>9} {today:>15} {s.files_waiting:>7} "
            f"{s.dead_letters:>5}  {check_marks(s.checks)}"
        )
    if unmapped:
        click.echo(
            f"{unmapped} dead-letter message(s) name no mapped table (cdc stack status shows the queue)"
        )


def check_marks(checks: dict[str, dict[str, Any]]) -> str:
    marks = []
    for name, label in CHECK_LABELS.items():
        result = checks.get(name)
        if not result:
            mark = "-"
        elif "passed" not in result:
            mark = "running" if result.get("status") == "planned" else result.get("status", "?")
        else:
            mark = "ok" if result["passed"] else "FAIL"
        marks.append(f"{label}:{mark}")
    return " ".join(marks)
