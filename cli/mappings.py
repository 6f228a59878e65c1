"""`cdc mappings validate | deploy | schema`: the table mappings analysts edit (cdc.mappings owns them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cdc.mappings import MappingError, json_schema, load_mappings, write_json_schema
from cli.common import config, deploy_working_mappings
from local_stack.dagster import LocalDagster


@click.group("mappings")
def command() -> None:
    """Table mappings: one JSON file per cluster in the mappings folder (CDC_MAPPINGS_DIR)."""


@command.command("validate")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def validate(path: Path | None) -> None:
    """Validate every mapping file (or the folder PATH); exit 1 naming file, table and field of each problem."""
    directory = path or config().mappings_dir
    if directory.is_file():
        raise click.ClickException(f"{directory}: give the mappings folder, not a file")
    try:
        loaded = load_mappings(directory)
    except MappingError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    tables = sum(len(c.tables) for c in loaded.clusters)
    enabled = sum(len(c.enabled_tables) for c in loaded.clusters)
    click.echo(f"{directory}: {len(loaded.clusters)} clusters, {tables} tables ({enabled} enabled): valid")


@command.command("deploy")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def deploy(path: Path | None) -> None:
    """Validate the mapping files (or the folder PATH) and, only if every one is valid, publish them to the running
    local platform: Dagster's code location is reloaded and the capture follows within seconds. A problem exits 1
    naming file, table and field, and changes nothing. (Production deploys through CI/CD, which validates first.)"""
    current = config()
    try:
        before = {t.source for _, t in load_mappings(current.deployed_mappings_dir).tables()}
    except MappingError:
        before = set()
    deployed, _ = deploy_working_mappings(path)
    after = {t.source for _, t in deployed.tables()}
    added, removed = sorted(after - before), sorted(before - after)
    click.echo(
        f"deployed {len(deployed.clusters)} clusters, {len(after)} enabled tables to {current.deployed_mappings_dir}"
        + (f"; added: {', '.join(added)}" if added else "")
        + (f"; removed: {', '.join(removed)}" if removed else "")
    )
    click.echo(reload_dagster())


def reload_dagster() -> str:
    try:
        return LocalDagster(config()).reload_code_location()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


@command.command("schema")
@click.option("--write", is_flag=True, help="Write mapping.schema.json into the mappings folder.")
def schema(write: bool) -> None:
    """Print (or write) the JSON Schema editors use for mapping files, generated from the models."""
    if write:
        click.echo(f"wrote {write_json_schema(config().mappings_dir)}")
    else:
        click.echo(json.dumps(json_schema(), indent=2))
