"""`cdc capture run | start | stop | status | reset`: the binlog capture (the capture package owns it)."""

from __future__ import annotations

import json
import sys

import click

from capture.runner import CAPTURE_STOPPED, capture_status, forget_checkpoint, run_clusters
from capture.service import CaptureSettings
from capture.supervisor import exec_supervisor
from cdc.settings import installed_command
from cli.common import config, deploy_working_mappings, mappings, platform_env, platform_mappings
from cli.mappings import reload_dagster
from local_stack.dagster import LocalDagster
from local_stack.processes import background_service


@click.group("capture")
def command() -> None:
    """The binlog capture: DMS-compatible Parquet files in S3 (for clusters without AWS DMS, and locally)."""


@command.command("run")
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable); default all.")
@click.option(
    "--flush-interval",
    type=float,
    default=CaptureSettings.flush_interval_s,
    show_default=True,
    help="Seconds between flushes (a file per changed table per flush; DMS: CdcMaxBatchInterval).",
)
@click.option(
    "--flush-rows",
    type=int,
    default=50_000,
    show_default=True,
    help="Flush once this many rows are buffered.",
)
@click.option(
    "--flush-mb",
    type=float,
    default=CaptureSettings.flush_bytes / 2**20,
    show_default=True,
    help="Flush once the buffered rows took this many MiB in the binlog (bounds the capture's memory).",
)
@click.option(
    "--date-folders/--no-date-folders",
    default=True,
    show_default=True,
    help="DMS DatePartitionEnabled layout.",
)
@click.option(
    "--unsupervised",
    is_flag=True,
    help="Run without the supervisor that restarts a crashed capture (its own child; implied by one --cluster).",
)
def run(
    clusters: tuple[str, ...],
    flush_interval: float,
    flush_rows: int,
    flush_mb: float,
    date_folders: bool,
    unsupervised: bool,
) -> None:
    """Full load, then stream each cluster's binlog until SIGTERM: every cluster in one process, a thread each, its
    failures its own; a supervisor starts the process again if it crashes (with one --cluster: no supervisor)."""
    loaded = mappings()
    try:
        chosen = [loaded.cluster(name) for name in clusters] if clusters else list(loaded.clusters)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    if not (unsupervised or len(clusters) == 1):
        exec_supervisor([installed_command("cdc"), *sys.argv[1:], "--unsupervised"])
    settings = CaptureSettings(
        flush_interval_s=flush_interval,
        flush_rows=flush_rows,
        flush_bytes=int(flush_mb * 2**20),
        date_folders=date_folders,
    )
    stopped = run_clusters(chosen, loaded, settings, config())
    for cluster, error in stopped.items():
        click.echo(f"Error: capture of {cluster} stopped: {error}", err=True)
    if stopped:
        sys.exit(CAPTURE_STOPPED)


@command.command("start")
@click.option("--flush-interval", type=float, default=CaptureSettings.flush_interval_s, show_default=True)
def start(flush_interval: float) -> None:
    """Run `cdc capture run` for every cluster in the background (log under the state folder)."""
    process = background_service("capture")
    if process.is_running():
        click.echo(f"capture already running (pid {process.pid()}); log: {process.log_file}")
        return
    _, changed = deploy_working_mappings()
    if changed and LocalDagster(config()).is_running():
        click.echo(reload_dagster())
    argv = [installed_command("cdc"), "capture", "run", "--flush-interval", str(flush_interval)]
    process.start(argv, ready=lambda: True, env=platform_env())
    click.echo(f"capture started (pid {process.pid()}); log: {process.log_file}")


@command.command("stop")
def stop() -> None:
    """Stop the background capture gracefully (it flushes and checkpoints first)."""
    click.echo(
        "capture stopped" if background_service("capture").stop(timeout=60) else "capture was not running"
    )


@command.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status documents as JSON.")
def status(as_json: bool) -> None:
    """Each cluster's capture: state, lag, rows/s, rows by op, last checkpoint, errors."""
    statuses = capture_status(platform_mappings(), config())
    if as_json:
        click.echo(json.dumps(statuses, indent=2))
        return
    for document in statuses:
        rows = document.get("rows", {})
        checkpoint = document.get("checkpoint", {})
        click.echo(
            f"{document['cluster']:<20} {document.get('state', '?'):<12} lag {document.get('lag_seconds', '-')} s  "
            f"{document.get('rows_per_second', 0)} rows/s  load {rows.get('load', 0)} I {rows.get('I', 0)} "
            f"U {rows.get('U', 0)} D {rows.get('D', 0)}  zero dates {document.get('zero_dates', 0)}  "
            f"checkpoint {checkpoint.get('gtid', '-')} ({checkpoint.get('commit_time', '-')})"
        )
        for error in document.get("errors", []):
            click.echo(f"    error: {error}")


@command.command("reset")
@click.option("--cluster", required=True, help="The cluster whose checkpoint to forget.")
def reset(cluster: str) -> None:
    """Forget a cluster's checkpoint: its next run starts with a new full load (re-snapshot); a running capture
    whose cluster stopped on an error starts that cluster again at once."""
    try:
        platform_mappings().cluster(cluster)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    forget_checkpoint(cluster, config())
    click.echo(
        f"{cluster}: checkpoint removed; a new full load follows (at once where its capture stopped on an error; "
        "otherwise at the next `cdc capture run`)"
    )
