"""`cdc stack up | down | status | env`: the local platform's servers (local_stack owns them)."""

from __future__ import annotations

import shlex
import sys

import click

from cdc import settings
from cli.common import config, mappings
from local_stack.dagster import LocalDagster
from local_stack.processes import StackError, background_service
from local_stack.stack import LocalStack, ServiceStatus


@click.group("stack")
def command() -> None:
    """The local platform: MariaDB per cluster, moto (S3+SQS), the BigQuery API server."""


@command.command("up")
@click.option(
    "--free-ports", is_flag=True, help="Pick unused ports for every server (tests, parallel stacks)."
)
@click.option("--mariadb-base-port", type=int, help="First MariaDB port; clusters get consecutive ports.")
@click.option("--moto-port", type=int, help="moto server (S3 + SQS) port.")
@click.option("--bigquery-port", type=int, help="BigQuery API server REST port.")
@click.option("--bigquery-grpc-port", type=int, help="BigQuery API server gRPC port (Storage APIs).")
@click.option(
    "--max-receive-count", type=int, help="Receives before a message moves to the dead-letter queue."
)
@click.option("--visibility-timeout", "visibility_timeout_s", type=int, help="SQS visibility timeout (s).")
def up(free_ports: bool, **ports: int | None) -> None:
    """Start every server (idempotent), wait until each answers, and show their health."""
    local = LocalStack(mappings())
    local.configure(free_ports=free_ports, **ports)
    try:
        statuses = local.up()
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    print_status(statuses)
    click.echo(f'state: {local.state_dir}  (configuration: `eval "$(cdc stack env)"`)')


@command.command("down")
def down() -> None:
    """Stop the background capture, Dagster and every server of the local stack (data stays in the state folder)."""
    stopped = ["dagster"] if LocalDagster(config()).stop(timeout=60) else []
    stopped += ["capture"] if background_service("capture").stop(timeout=60) else []
    stopped += LocalStack(mappings()).down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@command.command("status")
def status() -> None:
    """Each service's health; exit 1 if any is not healthy."""
    statuses = LocalStack(mappings()).status()
    print_status(statuses)
    if not all(s.healthy for s in statuses):
        sys.exit(1)


@command.command("env")
@click.option("--redact", is_flag=True, help="Show secrets as *** (for display, not for eval).")
def env(redact: bool) -> None:
    """`export` lines with every endpoint and name the platform reads (eval them in your shell)."""
    values = settings.local_stack_values()
    if not values:
        raise click.ClickException("the local stack has not been brought up yet: run `cdc stack up`")
    for key in sorted(values):
        secret = redact and key.endswith(("PASSWORD", "SECRET_ACCESS_KEY"))
        click.echo(f"export {key}={'***' if secret else shlex.quote(values[key])}")


def print_status(statuses: list[ServiceStatus]) -> None:
    width = max(len(s.name) for s in statuses)
    for status in statuses:
        click.echo(f"{status.name:<{width}}  127.0.0.1:{status.port:<5}  {status.health}")
