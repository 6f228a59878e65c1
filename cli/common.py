"""What the commands share: the settings and mappings of this process, and publishing the mappings the running
local platform reads."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cdc import settings
from cdc.mappings import MappingError, Mappings, deploy_mappings, load_mappings
from cdc.settings import SettingError, Settings


def config() -> Settings:
    try:
        return Settings.load()
    except SettingError as exc:
        raise click.ClickException(str(exc)) from exc


def mappings(path: Path | None = None) -> Mappings:
    try:
        return load_mappings(path or config().mappings_dir)
    except MappingError as exc:
        raise click.ClickException(str(exc)) from exc


def platform_mappings() -> Mappings:
    """The mappings the running platform reads: the deployed ones (`cdc mappings deploy`, `cdc capture start`,
    `cdc dagster start`) once there are any, else the working folder (CDC_MAPPINGS_DIR)."""
    deployed = config().deployed_mappings_dir
    return mappings(deployed if deployed.exists() else None)


def deploy_working_mappings(path: Path | None = None) -> tuple[Mappings, bool]:
    """Validate the working mappings and publish them for the running platform: (mappings, whether they changed).
    Any problem exits 1 naming file, table and field; the running platform keeps what it has."""
    current = config()
    target = current.deployed_mappings_dir
    previous = target.resolve() if target.is_symlink() else None
    try:
        deployed = deploy_mappings(path or current.mappings_dir, target)
    except MappingError as exc:
        click.echo(f"{exc}\nNothing was deployed: the running platform keeps the mappings it has.", err=True)
        sys.exit(1)
    return deployed, target.resolve() != previous


def platform_env() -> dict[str, str]:
    """The environment of the platform's background services: they read the deployed mappings."""
    return {**settings.resolved(), settings.MAPPINGS_DIR: str(config().deployed_mappings_dir)}
