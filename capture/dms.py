"""AWS DMS from the same mapping files: one replication task per cluster, writing what our capture writes.

`render` produces, per cluster, the task's table mappings (a selection rule per enabled table, an `add-column`
rule per table for the change sequence `$AR_H_CHANGE_SEQ`, a `change-data-type` rule per type override) and the
S3 target endpoint settings (Parquet, Op for the full load too, the commit-timestamp column, date folders,
batch interval). `apply` creates or replaces the endpoints and tasks through the DMS API, so one change to a
mapping file is one deploy for both DMS and the pipeline. Secrets (the source passwords) are read from the
environment variables the mapping names and are never printed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from cdc import settings
from cdc.landing import CHANGE_SEQUENCE_COLUMN, COMMIT_TIMESTAMP_COLUMN
from cdc.mappings import ClusterMapping, Mappings
from cdc.source import tls_mode

log = logging.getLogger("cdc.dms")

# The mapping's TLS modes as the DMS source endpoint's SslMode: DMS cannot fall back to plain TCP, so `preferred`
# (the default) asks for TLS, which RDS and Aurora always offer.
DMS_SSL_MODES = {"required": "require", "preferred": "require", "disabled": "none"}

# The mapping's BigQuery override types, as DMS data types (what DMS writes into Parquet for them).
DMS_TYPES: dict[str, dict[str, Any]] = {
    "BOOL": {"type": "boolean"},
    "INT64": {"type": "int8"},
    "NUMERIC": {"type": "numeric", "precision": 38, "scale": 9},
    "BIGNUMERIC": {"type": "string", "length": 100},
    "FLOAT64": {"type": "real8"},
    "STRING": {"type": "string", "length": 65535},
    "BYTES": {"type": "bytes", "length": 65535},
    "DATE": {"type": "date"},
    "DATETIME": {"type": "datetime", "scale": 6},
    "TIME": {"type": "string", "length": 20},
    "TIMESTAMP": {"type": "datetime", "scale": 6},
    "JSON": {"type": "string", "length": 65535},
}

REPLICATION_INSTANCE_ARN = "CDC_DMS_REPLICATION_INSTANCE_ARN"
S3_ROLE_ARN = "CDC_DMS_S3_ROLE_ARN"


def task_identifier(cluster: str) -> str:
    return f"cdc-{cluster.replace('_', '-')}"


def table_mappings(cluster: ClusterMapping) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []

    def add(rule: dict[str, Any]) -> None:
        rule_id = str(len(rules) + 1)
        rules.append({"rule-id": rule_id, "rule-name": f"{rule_id}-{rule.pop('name')}", **rule})

    for table in cluster.enabled_tables:
        locator = {"schema-name": table.source_schema, "table-name": table.source_table}
        add(
            {
                "name": f"select-{table.source}",
                "rule-type": "selection",
                "object-locator": dict(locator),
                "rule-action": "include",
                "filters": [],
            }
        )
        add(
            {
                "name": f"sequence-{table.source}",
                "rule-type": "transformation",
                "rule-target": "column",
                "object-locator": dict(locator),
                "rule-action": "add-column",
                "value": CHANGE_SEQUENCE_COLUMN,
                "expression": "$AR_H_CHANGE_SEQ",
                "data-type": {"type": "string", "length": 50},
            }
        )
        for column, bq_type in sorted(table.type_overrides.items()):
            add(
                {
                    "name": f"type-{table.source}.{column}",
                    "rule-type": "transformation",
                    "rule-target": "column",
                    "object-locator": {**locator, "column-name": column},
                    "rule-action": "change-data-type",
                    "data-type": dict(DMS_TYPES[bq_type]),
                }
            )
    return {"rules": rules}


BATCH_INTERVAL = "CDC_DMS_BATCH_INTERVAL_SECONDS"
DEFAULT_BATCH_INTERVAL_S = 5


def batch_interval_seconds(values: Mapping[str, str]) -> int:
    """DMS's CdcMaxBatchInterval: CDC_DMS_BATCH_INTERVAL_SECONDS (1-3600), default 5."""
    text = values.get(BATCH_INTERVAL, "").strip()
    if not text:
        return DEFAULT_BATCH_INTERVAL_S
    if not text.isdigit() or not 1 <= int(text) <= 3600:
        raise RuntimeError(f"{BATCH_INTERVAL}={text!r}: set a whole number of seconds, 1..3600")
    return int(text)


def s3_settings(values: Mapping[str, str]) -> dict[str, Any]:
    endpoint: dict[str, Any] = {
        "BucketName": values.get(settings.LANDING_BUCKET, "<CDC_LANDING_BUCKET>"),
        "BucketFolder": values.get(settings.LANDING_PREFIX, settings.DEFAULT_LANDING_PREFIX),
        "DataFormat": "parquet",
        "ParquetVersion": "parquet-2-0",
        "ParquetTimestampInMillisecond": False,
        "IncludeOpForFullLoad": True,
        "TimestampColumnName": COMMIT_TIMESTAMP_COLUMN,
        "DatePartitionEnabled": True,
        "DatePartitionSequence": "YYYYMMDD",
        "DatePartitionDelimiter": "SLASH",
        # a CDC file per table at least every N seconds (DMS's default, 60 s, is a minute of latency by itself);
        # cost of N: 70 busy tables write 70 x 86,400 / N files a day (docs/deploy.md, "DMS")
        "CdcMaxBatchInterval": batch_interval_seconds(values),
        "CdcMinFileSize": 32000,
        "EnableStatistics": True,
    }
    if values.get(S3_ROLE_ARN):
        endpoint["ServiceAccessRoleArn"] = values[S3_ROLE_ARN]
    return endpoint


@dataclass(frozen=True)
class RenderedTask:
    cluster: str
    identifier: str
    table_mappings: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ReplicationTaskIdentifier": self.identifier,
            "MigrationType": "full-load-and-cdc",
            "SourceEndpointIdentifier": f"{self.identifier}-source",
            "TargetEndpointIdentifier": "cdc-s3-landing",
            "TableMappings": self.table_mappings,
        }


def render(mappings: Mappings, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    values = settings.resolved(environ)
    tasks = [
        RenderedTask(c.cluster, task_identifier(c.cluster), table_mappings(c)) for c in mappings.clusters
    ]
    return {
        "target_endpoint": {
            "EndpointIdentifier": "cdc-s3-landing",
            "EngineName": "s3",
            "S3Settings": s3_settings(values),
        },
        "tasks": [task.as_dict() for task in tasks],
    }


class DmsApplier:
    """Creates or replaces endpoints and tasks. DMS cannot change a running task's mappings in place, so a task
    whose mappings changed is stopped, modified and resumed; where the API has no modify (moto), it is replaced."""

    def __init__(self, dms: Any, mappings: Mappings, environ: Mapping[str, str] | None = None):
        self.dms = dms
        self.mappings = mappings
        self.values = settings.resolved(environ)
        self.rendered = render(mappings, environ)

    def apply(self) -> list[str]:
        actions: list[str] = []
        instance_arn = self._replication_instance(actions)
        target_arn = self._endpoint(self.rendered["target_endpoint"], actions)
        for cluster, task in zip(self.mappings.clusters, self.rendered["tasks"], strict=True):
            source_arn = self._endpoint(self._source_endpoint(cluster, task), actions)
            self._task(task, instance_arn, source_arn, target_arn, actions)
        return actions

    def _replication_instance(self, actions: list[str]) -> str:
        configured = self.values.get(REPLICATION_INSTANCE_ARN)
        if configured:
            return configured
        if not self.values.get(settings.AWS_ENDPOINT_URL):
            raise RuntimeError(
                f"set {REPLICATION_INSTANCE_ARN} to the DMS replication instance that runs the tasks"
            )
        # Locally (moto) only: create a small instance so the tasks have one.
        identifier = "cdc-local"
        found = self.dms.describe_replication_instances(
            Filters=[{"Name": "replication-instance-id", "Values": [identifier]}]
        ).get("ReplicationInstances", [])
        if found:
            return str(found[0]["ReplicationInstanceArn"])
        created = self.dms.create_replication_instance(
            ReplicationInstanceIdentifier=identifier, ReplicationInstanceClass="dms.t3.micro"
        )
        actions.append(f"created replication instance {identifier}")
        return str(created["ReplicationInstance"]["ReplicationInstanceArn"])

    def _source_endpoint(self, cluster: ClusterMapping, task: dict[str, Any]) -> dict[str, Any]:
        c = cluster.connection
        return {
            "EndpointIdentifier": task["SourceEndpointIdentifier"],
            "EngineName": "mysql",
            "ServerName": settings.require(c.host_env, self.values),
            "Port": int(settings.require(c.port_env, self.values)),
            "Username": settings.require(c.user_env, self.values),
            "Password": settings.require(c.password_env, self.values),
            "SslMode": DMS_SSL_MODES[tls_mode(cluster, self.values)],
        }

    def _endpoint(self, spec: dict[str, Any], actions: list[str]) -> str:
        identifier = spec["EndpointIdentifier"]
        existing = self._describe("describe_endpoints", "endpoint-id", identifier, "Endpoints")
        if existing:
            return str(existing["EndpointArn"])
        created = self.dms.create_endpoint(
            EndpointType="target" if spec["EngineName"] == "s3" else "source", **spec
        )
        actions.append(f"created endpoint {identifier}")
        return str(created["Endpoint"]["EndpointArn"])

    def _describe(self, operation: str, filter_name: str, identifier: str, key: str) -> dict[str, Any] | None:
        try:
            found = getattr(self.dms, operation)(Filters=[{"Name": filter_name, "Values": [identifier]}]).get(
                key, []
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundFault":
                return None
            raise
        return dict(found[0]) if found else None

    def _task(
        self, task: dict[str, Any], instance: str, source: str, target: str, actions: list[str]
    ) -> None:
        identifier = task["ReplicationTaskIdentifier"]
        mappings_json = json.dumps(task["TableMappings"], sort_keys=True)
        existing = self._describe(
            "describe_replication_tasks", "replication-task-id", identifier, "ReplicationTasks"
        )
        if existing and json.dumps(json.loads(existing["TableMappings"]), sort_keys=True) == mappings_json:
            actions.append(f"task {identifier}: unchanged")
            return
        if existing:
            arn = existing["ReplicationTaskArn"]
            self._stop(arn)
            try:
                self.dms.modify_replication_task(ReplicationTaskArn=arn, TableMappings=mappings_json)
                self.dms.start_replication_task(
                    ReplicationTaskArn=arn, StartReplicationTaskType="resume-processing"
                )
                actions.append(f"task {identifier}: table mappings modified, resumed")
                return
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 500:
                    raise
                # moto has no modify_replication_task: replace the task instead.
                self.dms.delete_replication_task(ReplicationTaskArn=arn)
                actions.append(f"task {identifier}: replaced (the API has no modify)")
        created = self.dms.create_replication_task(
            ReplicationTaskIdentifier=identifier,
            SourceEndpointArn=source,
            TargetEndpointArn=target,
            ReplicationInstanceArn=instance,
            MigrationType=task["MigrationType"],
            TableMappings=mappings_json,
        )
        arn = created["ReplicationTask"]["ReplicationTaskArn"]
        self.dms.start_replication_task(ReplicationTaskArn=arn, StartReplicationTaskType="start-replication")
        actions.append(f"task {identifier}: created and started")

    def _stop(self, arn: str) -> None:
        task = self.dms.describe_replication_tasks(
            Filters=[{"Name": "replication-task-arn", "Values": [arn]}]
        )
        if task["ReplicationTasks"][0].get("Status") in ("running", "starting"):
            self.dms.stop_replication_task(ReplicationTaskArn=arn)
            for _ in range(300):
                status = self.dms.describe_replication_tasks(
                    Filters=[{"Name": "replication-task-arn", "Values": [arn]}]
                )["ReplicationTasks"][0]["Status"]
                if status == "stopped":
                    return
                time.sleep(1)
