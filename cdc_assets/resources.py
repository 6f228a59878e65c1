"""Dagster resources: the landing bucket and its queues (S3 + SQS), BigQuery, and the MySQL sources, configured from
the environment (`EnvVar` where a variable is set, so no value is stored; the running local stack's values
otherwise).

`LandingResource` is dagster-aws's `S3Resource` (its boto3 configuration, endpoint included) with the landing
bucket, prefix and queues added. dagster-gcp's `BigQueryResource` is not used: it builds its client from Google's
default credentials only, which a local BigQuery API server cannot supply (docs/deploy.md).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any
from urllib.parse import quote_plus

import botocore.config
import dagster as dg
from botocore.handlers import disable_signing
from dagster_aws.s3 import S3Resource
from google.cloud import bigquery
from pydantic import PrivateAttr

from cdc import settings
from cdc.alerts import Webhook
from cdc.clients import aws_session, bigquery_client, bigquery_write_client
from cdc.mappings import ClusterMapping
from cdc.settings import Settings
from cdc.source import MySQLConnection, cluster_connection


class LandingResource(S3Resource):
    """Where the capture or DMS lands Parquet files, and the queue their S3 events arrive on."""

    bucket: str
    prefix: str = settings.DEFAULT_LANDING_PREFIX
    queue_url: str = ""
    dead_letter_queue_url: str = ""
    # one S3 and one SQS client per resource (a run, a sensor tick), made from sessions sharing the process's parsed
    # service models: creating a client costs more CPU than the calls most uses make; clients are thread-safe,
    # their creation is not (hence the lock)
    _clients: dict[str, Any] = PrivateAttr(default_factory=dict)
    _clients_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, config: Settings) -> LandingResource:
        """The resource outside Dagster (the CLI, the benchmark), with the values themselves."""
        values = config.values
        return cls(
            bucket=config.require(settings.LANDING_BUCKET),
            prefix=config.landing_prefix,
            queue_url=config.sqs_queue_url,
            dead_letter_queue_url=config.sqs_dlq_url,
            endpoint_url=config.aws_endpoint_url or None,
            region_name=values.get(settings.AWS_REGION) or None,
            aws_access_key_id=values.get(settings.AWS_ACCESS_KEY_ID) or None,
            aws_secret_access_key=values.get(settings.AWS_SECRET_ACCESS_KEY) or None,
        )

    def get_object_to_set_on_execution_context(self) -> Any:
        """The resource itself. S3Resource hands Dagster a new boto3 client here, made from a new session that parses
        the S3 service model again, whenever Dagster sets up resources (every sensor tick, every run): the local code
        server's profile showed it costing more CPU than the sensors' own work. `s3()` makes one when it is used."""
        return self

    def s3(self) -> Any:
        return self._client("s3")

    def sqs(self) -> Any:
        return self._client("sqs")

    def _client(self, service: str) -> Any:
        with self._clients_lock:
            if service not in self._clients:
                self._clients[service] = self._new_client(service)
            return self._clients[service]

    def _new_client(self, service: str) -> Any:
        """A client with the resource's settings (S3Resource's fields), from a session sharing the process's
        parsed service models (cdc.clients.aws_session)."""
        client = aws_session(self.profile_name).client(  # type: ignore[call-overload,misc]
            service,
            region_name=self.region_name,
            endpoint_url=self.endpoint_url,
            use_ssl=self.use_ssl,
            verify=self.verify,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            config=botocore.config.Config(retries={"max_attempts": self.max_attempts, "mode": "standard"}),
        )
        if self.use_unsigned_session:
            client.meta.events.register(f"choose-signer.{service}.*", disable_signing)
        return client

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
    """BigQuery's REST API (jobs, tables, queries) and its Storage Write API (streaming mode)."""

    project: str
    endpoint: str = ""  # only set locally; empty = Google's API with application default credentials
    write_endpoint: str = ""  # only set locally: the Storage Write API's host:port (plain gRPC)
    location: str = ""

    def client(self) -> bigquery.Client:
        return bigquery_client(self.project, endpoint=self.endpoint or None, location=self.location or None)

    def write_client(self) -> Any:
        return bigquery_write_client(self.write_endpoint or None)


class MySqlSourceResource(dg.ConfigurableResource):
    """Read access to the source clusters, for the source-vs-BigQuery checks and the re-snapshot. A cluster's host,
    port, user and password come from the environment variables its mapping file names, read when they are
    needed (never stored or logged)."""

    connect_timeout_s: int = 10

    def connection(self, cluster: ClusterMapping) -> MySQLConnection:
        return cluster_connection(cluster, Settings.load())


def _from_env(config: Settings, name: str, default: str = "") -> Any:
    """An EnvVar (resolved by Dagster at run time, never stored) when set in the environment; otherwise the local
    stack's value, if one is running (these are endpoints and names, not secrets); otherwise the default."""
    if os.environ.get(name):
        return dg.EnvVar(name)
    return config.values.get(name) or default


def _optional_from_env(config: Settings, name: str) -> Any:
    value = _from_env(config, name)
    return value or None


def build_resources(config: Settings) -> dict[str, dg.ConfigurableResource]:
    return {
        "landing": LandingResource(
            bucket=_from_env(config, settings.LANDING_BUCKET),
            prefix=_from_env(config, settings.LANDING_PREFIX, settings.DEFAULT_LANDING_PREFIX),
            queue_url=_from_env(config, settings.SQS_QUEUE_URL),
            dead_letter_queue_url=_from_env(config, settings.SQS_DLQ_URL),
            endpoint_url=_optional_from_env(config, settings.AWS_ENDPOINT_URL),
            region_name=_optional_from_env(config, settings.AWS_REGION),
            aws_access_key_id=_optional_from_env(config, settings.AWS_ACCESS_KEY_ID),
            aws_secret_access_key=_optional_from_env(config, settings.AWS_SECRET_ACCESS_KEY),
        ),
        "bigquery": BigQueryCdcResource(
            project=_from_env(config, settings.BIGQUERY_PROJECT),
            endpoint=_from_env(config, settings.BIGQUERY_ENDPOINT),
            write_endpoint=_from_env(config, settings.BIGQUERY_WRITE_ENDPOINT),
            location=_from_env(config, settings.BIGQUERY_LOCATION),
        ),
        "mysql": MySqlSourceResource(),
    }


class AlertWebhookResource(dg.ConfigurableResource):
    """Where alerts go: a Slack-compatible incoming webhook (empty = log only)."""

    url: str = ""
    timeout_s: float = 10.0

    def post(self, title: str, lines: list[str], log: Any) -> bool:
        return Webhook(self.url, self.timeout_s).post(title, lines, log)


def build_alert_webhook() -> AlertWebhookResource:
    """The webhook from CDC_ALERT_WEBHOOK_URL, as an EnvVar: a secret is never stored in Dagster."""
    if os.environ.get(settings.ALERT_WEBHOOK_URL):
        return AlertWebhookResource(url=dg.EnvVar(settings.ALERT_WEBHOOK_URL))
    return AlertWebhookResource()
