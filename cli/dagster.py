"""`cdc dagster start | stop`: the local Dagster instance (local_stack.dagster owns it)."""

from __future__ import annotations

from pathlib import Path

import click

from cdc import settings
from cli.common import config, deploy_working_mappings, platform_env
from local_stack.dagster import LocalDagster


@click.group("dagster")
def command() -> None:
    """The local Dagster instance (webserver + daemon) running the pipeline's definitions."""


@command.command("start")
@click.option("--port", type=int, default=3000, show_default=True, help="Dagster UI port.")
def start(port: int) -> None:
    """Start Dagster (code server, webserver, daemon) in the background with DAGSTER_HOME under the state folder;
    print the UI URL."""
    local = LocalDagster(config())
    if local.is_running():
        click.echo(f"dagster already running (pid {local.process.pid()}): {local.url()}")
        return
    deploy_working_mappings()
    instance_yaml = settings.resolved().get(settings.DAGSTER_INSTANCE_YAML)
    for note in local.start(port, platform_env(), Path(instance_yaml) if instance_yaml else None):
        click.echo(note)
    click.echo(f"dagster started (pid {local.process.pid()}): {local.url()}  log: {local.process.log_file}")


@command.command("stop")
def stop() -> None:
    """Stop the background Dagster instance."""
    click.echo("dagster stopped" if LocalDagster(config()).stop(timeout=60) else "dagster was not running")
