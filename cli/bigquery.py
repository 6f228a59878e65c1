"""`cdc bigquery ls`: what has arrived in BigQuery (cdc_assets.status reads it)."""

from __future__ import annotations

import time

import click

from cdc.clients import bigquery_client_from
from cdc_assets.status import row_counts
from cli.common import config, platform_mappings


@click.group("bigquery")
def command() -> None:
    """Look at what has arrived in BigQuery."""


@command.command("ls")
@click.option("--wait", type=float, default=0.0, help="Wait up to this many seconds for the first table.")
def ls(wait: float) -> None:
    """Every mapped table's current-state and changelog row counts (tables not created yet are skipped)."""
    client = bigquery_client_from(config())
    loaded = platform_mappings()
    deadline = time.monotonic() + wait
    rows = row_counts(loaded, client)
    while not rows and time.monotonic() < deadline:
        time.sleep(2)
        rows = row_counts(loaded, client)
    for name, count in rows:
        click.echo(f"{name:<45} {count:>8} rows")
    click.echo(f"{len(rows)} BigQuery table(s)")
