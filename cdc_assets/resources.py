"""Dagster resources: the landing bucket (S3) and BigQuery, configured only from environment variables.

dagster-gcp's BigQueryResource cannot point at another API endpoint, and dagster-aws' S3Resource has no SQS;
these two small resources wrap the shared client factories in `cdc.clients`, so the same definitions run on the
local servers (endpoints set) and on real AWS/GCP (endpoints unset).
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
from google.cloud import bigquery

from cdc import environment
from cdc.clients import aws_client, bigquery_client


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


class BigQueryCdcResource(dg.ConfigurableResource):
    project: str
    endpoint: str = ""  # only set locally; empty = Google's API with application default credentials
    location: str = ""

    def client(self) -> bigquery.Client:
        return bigquery_client(self.project, endpoint=self.endpoint or None, location=self.location or None)


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
    }
