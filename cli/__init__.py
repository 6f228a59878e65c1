"""`cdc`: the user's entry point to the platform. One module per command group; each command parses its options
and calls the package that owns the behaviour (docs/operating.md lists every command)."""

from __future__ import annotations

import click

from cli import bigquery, capture, dagster, dms, mappings, resnapshot, stack, status, workload


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Near-real-time MySQL -> BigQuery change data capture on Dagster."""


for group in (mappings, stack, capture, dagster, status, resnapshot, bigquery, dms, workload):
    main.add_command(group.command)
