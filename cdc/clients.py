"""Clients for the platform's external services, built from configuration only.

The same code talks to the local servers (an endpoint is configured) and to real AWS/GCP (no endpoint:
boto3 and google-cloud-bigquery use their default endpoints and credentials chains).
"""

from __future__ import annotations

from typing import Any

import boto3
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery


def bigquery_client(
    project: str, endpoint: str | None = None, location: str | None = None
) -> bigquery.Client:
    """A BigQuery client; with ``endpoint`` set it talks to that API server without Google credentials."""
    if endpoint:
        return bigquery.Client(
            project=project,
            location=location,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=endpoint),
        )
    return bigquery.Client(project=project, location=location)


def aws_client(service: str, endpoint: str | None = None, region: str | None = None) -> Any:
    """A boto3 client; credentials come from boto3's own chain (environment, instance role, ...)."""
    return boto3.client(service, endpoint_url=endpoint or None, region_name=region or None)  # type: ignore[call-overload]
