"""`cdc dms render | apply`: AWS DMS tasks from the same mapping files (capture.dms owns them)."""

from __future__ import annotations

import json

import click
from botocore.exceptions import BotoCoreError, ClientError

from capture.dms import DmsApplier, render
from cdc.clients import aws_client
from cli.common import mappings


@click.group("dms")
def command() -> None:
    """AWS DMS tasks rendered from the same mapping files (one deploy for DMS and the pipeline)."""


@command.command("render")
def render_command() -> None:
    """Print the DMS S3 target settings and, per cluster, the task with its table-mapping rules (JSON)."""
    click.echo(json.dumps(render(mappings()), indent=2))


@command.command("apply")
def apply() -> None:
    """Create or replace the DMS endpoints and tasks so they match the mappings."""
    try:
        actions = DmsApplier(aws_client("dms"), mappings()).apply()
    except (ClientError, BotoCoreError, RuntimeError) as exc:
        raise click.ClickException(f"DMS apply failed: {exc}") from exc
    for action in actions:
        click.echo(action)
