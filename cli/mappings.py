"""`cdc mappings validate | deploy | add | schema`: the table mappings analysts edit (cdc.mappings owns them;
capture.mapping_proposal reads a new table's entry from the source)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from capture.mapping_proposal import ProposalError, propose_table
from cdc.mappings import (
    ClusterMapping,
    MappingError,
    json_schema,
    load_mappings,
    mapping_files,
    write_json_schema,
)
from cdc.settings import SettingError
from cdc.source import cluster_connection
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


@command.command("add")
@click.argument("cluster")
@click.argument("source")
@click.option(
    "--target", help="BigQuery dataset.table (default: the cluster's dataset, the source table's name)."
)
@click.option(
    "--accept-overrides", is_flag=True, help="Write the proposed type overrides (e.g. TINYINT(1) -> BOOL)."
)
def add(cluster: str, source: str, target: str | None, accept_overrides: bool) -> None:
    """Map SOURCE (schema.table) of CLUSTER: read its columns and key from the source and add its entry to the
    cluster's mapping file, then validate. Then `cdc mappings deploy`."""
    directory = config().mappings_dir
    found = [(p, _read_json(p)) for p in mapping_files(directory)]
    matches = [(p, data) for p, data in found if isinstance(data, dict) and data.get("cluster") == cluster]
    if not matches:
        raise click.ClickException(
            f"no mapping file for cluster {cluster} in {directory}: create {directory / (cluster + '.json')} "
            "with its connection (README, 'Adding a table')"
        )
    path, data = matches[0]
    try:
        mapping = ClusterMapping.model_validate(data)
    except ValueError as exc:
        raise click.ClickException(f"{path} is not valid; run `cdc mappings validate` first: {exc}") from exc
    if any(t.source == source for t in mapping.tables):
        raise click.ClickException(f"{source} is already mapped in {path}")
    if target is None:
        datasets = [t.target_dataset for t in mapping.tables]
        dataset = max(set(datasets), key=datasets.count) if datasets else source.split(".")[0]
        target = f"{dataset}.{source.split('.', 1)[-1]}"
    try:
        connection = cluster_connection(mapping, config()).connect(connect_timeout=10)
    except (SettingError, OSError) as exc:
        raise click.ClickException(f"cannot reach cluster {cluster}'s source: {exc}") from exc
    except Exception as exc:  # pymysql's errors: the server refused or is down
        raise click.ClickException(f"cannot connect to cluster {cluster}'s source: {exc}") from exc
    try:
        proposal = propose_table(connection, source, target)
    except ProposalError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        connection.close()
    entry = dict(proposal.entry)
    if accept_overrides and proposal.overrides:
        entry["type_overrides"] = proposal.overrides
    before = path.read_text(encoding="utf-8")
    data.setdefault("tables", []).append(entry)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    try:
        load_mappings(directory)
    except MappingError as exc:
        path.write_text(before, encoding="utf-8")
        raise click.ClickException(f"the new entry does not validate, {path} is unchanged:\n{exc}") from exc
    click.echo(f"added {source} -> {target} to {path}: {json.dumps(entry)}")
    for column, override in proposal.overrides.items():
        state = "written" if accept_overrides else "proposed, not written (--accept-overrides writes it)"
        click.echo(f"  {column} -> {override}: {proposal.reasons[column]} [{state}]")
    for warning in proposal.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo("next: cdc mappings deploy")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # `cdc mappings validate` names it


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
