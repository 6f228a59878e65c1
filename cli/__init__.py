"""`cdc`: the user's entry point to the platform. One module per command group; each command parses its options
and calls the package that owns the behaviour (docs/operating.md lists every command). A command's module is
imported only when that command runs: `cdc capture run` should not pay for importing Dagster."""

from __future__ import annotations

import importlib
from typing import Any

import click

COMMANDS = {  # name: (module, one line for `cdc --help`)
    "mappings": ("cli.mappings", "Table mappings: validate, deploy to the running platform, JSON Schema."),
    "stack": ("cli.stack", "The local servers: MariaDB per cluster, moto (S3+SQS), the BigQuery API server."),
    "capture": ("cli.capture", "The binlog capture: DMS-compatible Parquet files in S3."),
    "dagster": ("cli.dagster", "The local Dagster instance (webserver + daemon)."),
    "status": ("cli.status", "Per mapped table: lag, rows today, files waiting, dead letters, checks."),
    "checks": ("cli.checks", "Run every table's checks now (the table_checks job)."),
    "resnapshot": ("cli.resnapshot", "Re-snapshot a table (or a cluster's tables) from the source."),
    "bigquery": ("cli.bigquery", "Look at what has arrived in BigQuery."),
    "dms": ("cli.dms", "AWS DMS tasks rendered from the same mapping files."),
    "workload": ("cli.workload", "The demo workload on the local clusters."),
}


class LazyGroup(click.Group):
    """Click's documented lazy-loading group: subcommands are imported from COMMANDS on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        command: Any = importlib.import_module(COMMANDS[cmd_name][0]).command
        return command  # type: ignore[no-any-return]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in sorted(COMMANDS.items())])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Near-real-time MySQL -> BigQuery change data capture on Dagster."""
