"""Dagster resources: the landing bucket (S3), BigQuery and the MySQL sources, configured only from the environment.

dagster-gcp's BigQueryResource cannot point at another API endpoint, and dagster-aws' S3Resource has no SQS;
these two small resources wrap the shared client factories in `cdc.clients`, so the same definitions run on the
local servers (endpoints set) and on real AWS/GCP (endpoints unset).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote_plus

import dagster as dg
from google.cloud import bigquery

from capture.runner import mysql_connection
from capture.service import MySQLConnection
from cdc import environment
from cdc.clients import aws_client, bigquery_client
from cdc.mappings import ClusterMapping


class LandingResource(dg.ConfigurableResource):
    """Where the capture or DMS lands Parquet files, and the queue their S3 events arrive on."""

    bucket: str
    prefix: str = environment.DEFAULT_LANDING_PREFIX
    queue_url: str = ""
    dead_letter_queue_url: str = ""

    def s3(self) -> Any:
        return aws_client("s3")

    def sqs(self) -> Any:
        return aws_client("sqs")

    def dead_letter(self, body: str, reason: str, receipt_handle: str | None = None) -> None:
        """Put a message on the dead-letter queue with the reason as its `cdc_reason` attribute (then delete the
        original from the main queue, when its receipt handle is given)."""
        sqs = self.sqs()
        sqs.send_message(
            QueueUrl=self.dead_letter_queue_url,
            MessageBody=body,
            MessageAttributes={"cdc_reason": {"DataType": "String", "StringValue": reason[:1000]}},
        )
        if receipt_handle:
            sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=receipt_handle)

    def dead_letters(self, hide_seconds: int = 10, limit: int = 1000) -> list[dict[str, Any]]:
        """Every message in the dead-letter queue (up to `limit`), left in the queue for a redrive. Paging hides each
        seen message for `hide_seconds`, so a second reader within that time sees fewer."""
        if not self.dead_letter_queue_url:
            return []
        sqs = self.sqs()
        seen: dict[str, dict[str, Any]] = {}
        while len(seen) < limit:
            messages = sqs.receive_message(
                QueueUrl=self.dead_letter_queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                VisibilityTimeout=hide_seconds,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            fresh = [m for m in messages if m["MessageId"] not in seen]
            if not fresh:
                break
            seen.update((m["MessageId"], m) for m in fresh)
        return list(seen.values())

    def dead_letter_file(self, key: str, reason: str) -> None:
        """Dead-letter one landed file as an S3 event of it, so a redrive after fixing the file loads it."""
        record = {
            "eventSource": "aws:s3",
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": self.bucket}, "object": {"key": quote_plus(key, safe="/")}},
        }
        self.dead_letter(json.dumps({"Records": [record]}), reason)


class BigQueryCdcResource(dg.ConfigurableResource):
    project: str
    endpoint: str = ""  # only set locally; empty = Google's API with application default credentials
    location: str = ""

    def client(self) -> bigquery.Client:
        return bigquery_client(self.project, endpoint=self.endpoint or None, location=self.location or None)


class MySqlSourceResource(dg.ConfigurableResource):
    """Read access to the source clusters, for the row-count checks. A cluster's host, port, user and password
    come from the environment variables its mapping file names, read when a check runs (never stored or logged)."""

    connect_timeout_s: int = 10

    def connection(self, cluster: ClusterMapping) -> MySQLConnection:
        return mysql_connection(cluster)


def _setting(name: str, default: str = "") -> Any:
    """An EnvVar (resolved by Dagster at run time, never stored) when set in the environment; otherwise the local
    stack's value, if one is running (these are endpoints and names, not secrets); otherwise the default."""
    if os.environ.get(name):
        return dg.EnvVar(name)
    return environment.local_stack_values().get(name, default)


def resources_from_env() -> dict[str, dg.ConfigurableResource]:
    return {
        "landing": LandingResource(
            bucket=_setting(environment.LANDING_BUCKET),
            prefix=_setting(environment.LANDING_PREFIX, environment.DEFAULT_LANDING_PREFIX),
            queue_url=_setting(environment.SQS_QUEUE_URL),
            dead_letter_queue_url=_setting(environment.SQS_DLQ_URL),
        ),
        "bigquery": BigQueryCdcResource(
            project=_setting(environment.BIGQUERY_PROJECT),
            endpoint=_setting(environment.BIGQUERY_ENDPOINT),
            location=_setting(environment.BIGQUERY_LOCATION),
        ),
        "mysql": MySqlSourceResource(),
    }
