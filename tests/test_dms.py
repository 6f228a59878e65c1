"""DMS tasks from the mapping files: rule syntax as DMS documents it, and create/replace through the DMS API (moto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from capture.dms import DMS_TYPES, render
from cdc.clients import aws_client
from cdc.mappings import load_mappings
from cli import main
from local_stack.stack import LocalStack

SHIPPED = Path(__file__).resolve().parent.parent / "mappings"

# The table-mapping rule shapes from the DMS user guide ("Specifying table selection and transformations rules
# using JSON"): required keys, and the allowed values of the enumerated ones.
RULE_SHAPES: dict[tuple[str, str], set[str]] = {
    ("selection", "include"): {"rule-id", "rule-name", "rule-type", "object-locator", "rule-action"},
    ("transformation", "add-column"): {
        "rule-id",
        "rule-name",
        "rule-type",
        "rule-target",
        "object-locator",
        "rule-action",
        "value",
        "expression",
        "data-type",
    },
    ("transformation", "change-data-type"): {
        "rule-id",
        "rule-name",
        "rule-type",
        "rule-target",
        "object-locator",
        "rule-action",
        "data-type",
    },
}
DMS_DATA_TYPES = {
    "bytes",
    "date",
    "time",
    "datetime",
    "int1",
    "int2",
    "int4",
    "int8",
    "numeric",
    "real4",
    "real8",
    "string",
    "uint1",
    "uint2",
    "uint4",
    "uint8",
    "wstring",
    "blob",
    "nclob",
    "clob",
    "boolean",
}


def _check_rule_syntax(rules: list[dict[str, Any]]) -> None:
    ids = [rule["rule-id"] for rule in rules]
    assert len(set(ids)) == len(ids) and all(i.isdigit() for i in ids)
    assert len({rule["rule-name"] for rule in rules}) == len(rules)
    for rule in rules:
        shape = RULE_SHAPES[(rule["rule-type"], rule["rule-action"])]
        assert shape <= set(rule), f"{rule['rule-name']}: missing {shape - set(rule)}"
        locator = rule["object-locator"]
        assert {"schema-name", "table-name"} <= set(locator)
        if rule["rule-type"] == "transformation":
            assert rule["rule-target"] == "column"
            assert rule["data-type"]["type"] in DMS_DATA_TYPES
        if rule["rule-action"] == "change-data-type":
            assert "column-name" in locator


def test_render_has_a_selection_and_a_sequence_rule_per_table_and_the_overrides() -> None:
    mappings = load_mappings(SHIPPED)
    rendered = render(mappings, environ={"CDC_LANDING_BUCKET": "landing", "CDC_LANDING_PREFIX": "cdc"})
    assert len(rendered["tasks"]) == 6
    for cluster, task in zip(mappings.clusters, rendered["tasks"], strict=True):
        rules = task["TableMappings"]["rules"]
        _check_rule_syntax(rules)
        selected = {
            f"{r['object-locator']['schema-name']}.{r['object-locator']['table-name']}"
            for r in rules
            if r["rule-type"] == "selection"
        }
        assert selected == {t.source for t in cluster.enabled_tables}
        sequences = [r for r in rules if r["rule-action"] == "add-column"]
        assert len(sequences) == len(cluster.enabled_tables)
        assert all(
            r["expression"] == "$AR_H_CHANGE_SEQ" and r["value"] == "cdc_change_seq" for r in sequences
        )
        overrides = {
            (r["object-locator"]["table-name"], r["object-locator"]["column-name"]): r["data-type"]
            for r in rules
            if r["rule-action"] == "change-data-type"
        }
        expected = {
            (t.source_table, c): DMS_TYPES[b]
            for t in cluster.enabled_tables
            for c, b in t.type_overrides.items()
        }
        assert overrides == expected
    settings = rendered["target_endpoint"]["S3Settings"]
    assert settings["DataFormat"] == "parquet" and settings["IncludeOpForFullLoad"] is True
    assert settings["TimestampColumnName"] == "cdc_commit_timestamp"
    assert (settings["BucketName"], settings["BucketFolder"]) == ("landing", "cdc")
    assert settings["DatePartitionEnabled"] is True and settings["DatePartitionDelimiter"] == "SLASH"


def test_disabled_tables_are_not_selected(tmp_path: Path) -> None:
    document = json.loads((SHIPPED / "poker_play.json").read_text())
    document["tables"][0]["enabled"] = False
    (tmp_path / "poker_play.json").write_text(json.dumps(document))
    [task] = render(load_mappings(tmp_path), environ={})["tasks"]
    selected = [r for r in task["TableMappings"]["rules"] if r["rule-type"] == "selection"]
    assert len(selected) == len(document["tables"]) - 1
    assert document["tables"][0]["source"].split(".")[1] not in {
        r["object-locator"]["table-name"] for r in selected
    }


def _cluster_file(folder: Path, cluster: str, tables: list[str]) -> None:
    prefix = f"CDC_MYSQL_{cluster.upper()}"
    document = {
        "cluster": cluster,
        "connection": {
            k: f"{prefix}_{k.split('_')[0].upper()}"
            for k in ("host_env", "port_env", "user_env", "password_env")
            + (("tls_env",) if cluster == "dms_b" else ())
        },
        "tables": [
            {"source": f"{cluster}.{t}", "target": f"{cluster}.{t}", "primary_key": ["id"]} for t in tables
        ],
    }
    (folder / f"{cluster}.json").write_text(json.dumps(document))


@pytest.fixture
def dms_env(local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)
    for cluster in ("dms_a", "dms_b"):
        for part, value in (
            ("HOST", "db.example"),
            ("PORT", "3306"),
            ("USER", "replicator"),
            ("PASSWORD", "s3cr3t-pw"),
            ("TLS", "disabled"),
        ):
            monkeypatch.setenv(f"CDC_MYSQL_{cluster.upper()}_{part}", value)
    monkeypatch.setenv("CDC_MAPPINGS_DIR", str(tmp_path))
    _cluster_file(tmp_path, "dms_a", ["players"])
    _cluster_file(tmp_path, "dms_b", ["bets"])
    return tmp_path


def _tasks() -> dict[str, dict[str, Any]]:
    found = aws_client("dms").describe_replication_tasks()["ReplicationTasks"]
    return {
        t["ReplicationTaskIdentifier"]: t
        for t in found
        if t["ReplicationTaskIdentifier"].startswith("cdc-dms-")
    }


def test_apply_creates_is_idempotent_and_follows_a_mapping_change(dms_env: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(main, ["dms", "apply"])
    assert first.exit_code == 0, first.output
    assert "task cdc-dms-a: created and started" in first.output and "s3cr3t-pw" not in first.output
    tasks = _tasks()
    assert set(tasks) == {"cdc-dms-a", "cdc-dms-b"}
    rendered = {t["ReplicationTaskIdentifier"]: t for t in render(load_mappings(dms_env))["tasks"]}
    for identifier, task in tasks.items():
        assert json.loads(task["TableMappings"]) == rendered[identifier]["TableMappings"]
        assert task["MigrationType"] == "full-load-and-cdc"

    second = runner.invoke(main, ["dms", "apply"])
    assert second.exit_code == 0 and second.output.count("unchanged") == 2

    _cluster_file(dms_env, "dms_a", ["players", "wallets"])  # an analyst adds a table
    third = runner.invoke(main, ["dms", "apply"])
    assert third.exit_code == 0, third.output
    assert "task cdc-dms-a: replaced" in third.output and "task cdc-dms-b: unchanged" in third.output
    rules = json.loads(_tasks()["cdc-dms-a"]["TableMappings"])["rules"]
    assert {r["object-locator"]["table-name"] for r in rules if r["rule-type"] == "selection"} == {
        "players",
        "wallets",
    }

    endpoint = aws_client("dms").describe_endpoints(
        Filters=[{"Name": "endpoint-id", "Values": ["cdc-s3-landing"]}]
    )
    assert endpoint["Endpoints"][0]["S3Settings"]["DataFormat"] == "parquet"
    # the source endpoints' TLS: dms_a names no TLS variable (the default, TLS), dms_b's says disabled
    sources = {
        e["EndpointIdentifier"]: e
        for e in aws_client("dms").describe_endpoints()["Endpoints"]
        if e["EndpointType"].lower() == "source"
    }
    assert {i: e["SslMode"] for i, e in sources.items()} == {
        "cdc-dms-a-source": "require",
        "cdc-dms-b-source": "none",
    }


def test_render_cli_prints_json() -> None:
    result = CliRunner().invoke(main, ["dms", "render"])
    assert result.exit_code == 0
    assert len(json.loads(result.output)["tasks"]) == 6


def test_dms_writes_a_cdc_file_every_few_seconds_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    mappings = load_mappings()
    monkeypatch.delenv("CDC_DMS_BATCH_INTERVAL_SECONDS", raising=False)
    assert render(mappings)["target_endpoint"]["S3Settings"]["CdcMaxBatchInterval"] == 5  # DMS's own: 60
    monkeypatch.setenv("CDC_DMS_BATCH_INTERVAL_SECONDS", "30")
    assert render(mappings)["target_endpoint"]["S3Settings"]["CdcMaxBatchInterval"] == 30
    monkeypatch.setenv("CDC_DMS_BATCH_INTERVAL_SECONDS", "0")
    with pytest.raises(RuntimeError, match="CDC_DMS_BATCH_INTERVAL_SECONDS='0'"):
        render(mappings)
