"""Deployment files: the production instance variants agree, validate against their launchers' config schemas,
and the CI/CD workflow calls commands that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from dagster._config import process_config

from cli import main as cdc_cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SHARED = (
    "storage",
    "run_coordinator",
    "run_monitoring",
    "concurrency",
    "sensors",
    "compute_logs",
    "telemetry",
)
ENV = {
    "DAGSTER_PG_HOST": "db.internal",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "not-a-real-one",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_K8S_NAMESPACE": "cdc",
}


def load_files(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / name / "dagster.yaml").read_text()))


def _validate(section: dict[str, Any]) -> None:
    module = section["module"].replace(
        "dagster.core.", "dagster._core."
    )  # Dagster's own alias in instance files
    klass = getattr(importlib.import_module(module), section["class"])
    result = process_config(klass.config_type(), section.get("config", {}))
    assert result.success, [error.message for error in result.errors or []]


@pytest.mark.parametrize("variant", ["k8s", "ecs"])
def test_production_variants_are_the_tested_postgres_instance_plus_a_run_launcher(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    base, instance = load_files("postgres"), load_files(variant)
    assert {k: instance[k] for k in SHARED} == {k: base[k] for k in SHARED}
    assert set(instance) == {*SHARED, "run_launcher"}
    _validate(instance["run_launcher"])
    from dagster_postgres import DagsterPostgresStorage

    assert process_config(DagsterPostgresStorage.config_type(), instance["storage"]["postgres"]).success
    _validate(instance["compute_logs"])
    assert instance["run_coordinator"]["config"]["dequeue_interval_seconds"] == 1
    assert instance["sensors"]["use_threads"]  # the SQS sensor's long poll does not hold up the alert sensors
    from dagster._core.instance.config import dagster_instance_config_schema

    monitoring = {"run_monitoring": instance["run_monitoring"], "sensors": instance["sensors"]}
    assert process_config(dagster_instance_config_schema(), monitoring).success
    assert (
        instance["run_monitoring"]["enabled"]
        and instance["run_monitoring"]["free_slots_after_run_end_seconds"]
    )
    text = (DEPLOY / variant / "dagster.yaml").read_text()
    assert "password: {env: DAGSTER_PG_PASSWORD}" in text and "not-a-real-one" not in text


def test_the_low_latency_variant_starts_runs_in_the_code_location_and_bounds_heavy_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    base, instance = load_files("postgres"), load_files("k8s-low-latency")
    assert (
        "run_launcher" not in instance
    )  # Dagster's default launcher: a process of the code location per run
    assert {k: instance[k] for k in SHARED if k != "concurrency"} == {
        k: base[k] for k in SHARED if k != "concurrency"
    }
    assert instance["concurrency"]["pools"] == base["concurrency"]["pools"]
    limits = instance["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "cdc/heavy", "limit": 2} in limits
    from cdc_assets.resnapshot import HEAVY_RUN_TAG

    assert HEAVY_RUN_TAG == "cdc/heavy"


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        found.add((*prefix, name))
        if isinstance(command, click.Group):
            found |= _commands(command, (*prefix, name))
    return found


def test_the_ci_cd_workflow_validates_then_applies_dms_and_reloads_the_code_location() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "deploy.yml").read_text())
    jobs = workflow["jobs"]
    scripts = {job: "\n".join(step.get("run", "") for step in spec["steps"]) for job, spec in jobs.items()}
    assert "cdc mappings validate" in scripts["validate"] and "cdc mappings validate" not in scripts["deploy"]
    assert jobs["deploy"]["needs"] == "validate" and "refs/heads/main" in jobs["deploy"]["if"]
    assert "cdc dms apply" in scripts["deploy"] and "reloadRepositoryLocation" in scripts["deploy"]
    location = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    assert f'\\"{location["location_name"]}\\"' in scripts["deploy"]
    known = _commands(cdc_cli)
    for script in scripts.values():
        for words in re.findall(r"^\s*cdc ([a-z-]+(?: [a-z-]+)?)", script, re.MULTILINE):
            assert tuple(words.split()) in known, f"the workflow calls `cdc {words}`, which does not exist"


def test_the_image_holds_every_package_and_the_mappings() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE))
    assert {"cdc", "capture", "cdc_assets", "sensors", "cli", "local_stack", "mappings"} <= copied
    assert {"definitions.py", "workspace.yaml"} <= copied
    assert '"-m", "definitions"' in dockerfile
    assert "ENV MALLOC_ARENA_MAX=2" in dockerfile  # as the local Dagster's processes (local_stack/dagster.py)


@pytest.mark.parametrize(
    "variant", sorted(p.name for p in DEPLOY.iterdir() if (p / "dagster.yaml").is_file())
)
def test_every_instance_file_loads_as_dagster_loads_it(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dagster's own loading of an instance file (the whole file, its sections checked against each other: e.g. run
    limits under `run_coordinator` are refused once `concurrency` is set) - what the daemon does at start."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(DEPLOY / variant))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_the_local_instance_bounds_the_sensor_s_load_runs_and_the_heavy_runs() -> None:
    """Batch mode's memory: a load run is a worker process; a few at once carry the load (each loads its tables in
    threads), the rest queue and their tables' files gather into later runs."""
    from cdc_assets.resnapshot import HEAVY_RUN_TAG
    from sensors.sqs_sensor import LOAD_RUN_TAG

    limits = load_files("local")["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": LOAD_RUN_TAG, "value": "sensor", "limit": 3} in limits
    assert {"key": HEAVY_RUN_TAG, "limit": 2} in limits
