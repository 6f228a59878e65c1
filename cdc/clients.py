"""Clients for the platform's external services, built from configuration only.

The same code talks to the local servers (an endpoint is configured) and to real AWS/GCP (no endpoint: boto3 and
the Google clients use their default endpoints and credential chains).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import boto3
import botocore.loaders
import botocore.session

from cdc import settings
from cdc.settings import Settings

if TYPE_CHECKING:  # the Google libraries load where a BigQuery client is built: the capture never needs them
    from google.cloud import bigquery


def bigquery_client(
    project: str, endpoint: str | None = None, location: str | None = None
) -> bigquery.Client:
    """A BigQuery client; with ``endpoint`` set it talks to that API server without Google credentials."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    if endpoint:
        return bigquery.Client(
            project=project,
            location=location,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=endpoint),
        )
    return bigquery.Client(project=project, location=location)


def bigquery_client_from(config: Settings) -> bigquery.Client:
    """The BigQuery client of the configured project (CDC_BIGQUERY_PROJECT, _ENDPOINT, _LOCATION)."""
    return bigquery_client(
        config.require(settings.BIGQUERY_PROJECT),
        config.bigquery_endpoint or None,
        config.bigquery_location or None,
    )


def bigquery_write_client(write_endpoint: str | None = None) -> Any:
    """A Storage Write API client; with ``write_endpoint`` (`host:port`) it talks to that server over plain gRPC
    (a local BigQuery API server), otherwise to Google's with application default credentials."""
    import grpc
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient
    from google.cloud.bigquery_storage_v1.services.big_query_write.transports import (
        BigQueryWriteGrpcTransport,
    )

    if not write_endpoint:
        return BigQueryWriteClient()
    limit = 32 * 1024 * 1024  # above the 20 MB an AppendRows request may have
    channel = grpc.insecure_channel(
        write_endpoint,
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
    )
    return BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=channel))


_loader: botocore.loaders.Loader | None = None
_loader_lock = threading.Lock()


def aws_session(profile_name: str | None = None) -> boto3.session.Session:
    """A boto3 session that shares this process's botocore data loader: the service models (JSON files of
    hundreds of KB) are parsed once per process, not again for each new session's client - a sensor tick and a run
    each make one, and the parsing costs more CPU than most of their calls."""
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))
    core = botocore.session.Session()
    core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core, profile_name=profile_name)


PAGINATED_CALLS = {"s3": "list_objects_v2", "sqs": "list_queues"}  # whose paginator models to parse too


def preload_aws_models(services: Iterable[str] = ("s3", "sqs")) -> None:
    """Parse the models of `services` (and their paginators) into the shared loader; no request is made. For a
    process whose children are forked (the local run workers' fork server)."""
    session = aws_session()
    for service in services:
        client = session.client(  # type: ignore[call-overload]
            service, region_name="us-east-1", aws_access_key_id="-", aws_secret_access_key="-"
        )
        if service in PAGINATED_CALLS:
            client.get_paginator(PAGINATED_CALLS[service])


def aws_client(service: str, environ: Mapping[str, str] | None = None) -> Any:
    """A boto3 client from the platform's configuration (see cdc.settings).

    Endpoint and keys are passed only when configured (locally); otherwise boto3 uses its own chain
    (instance/task role, profile) and AWS's endpoints.
    """
    values = settings.resolved(environ)
    return aws_session().client(  # type: ignore[call-overload]
        service,
        endpoint_url=values.get(settings.AWS_ENDPOINT_URL) or None,
        region_name=values.get(settings.AWS_REGION) or None,
        aws_access_key_id=values.get(settings.AWS_ACCESS_KEY_ID) or None,
        aws_secret_access_key=values.get(settings.AWS_SECRET_ACCESS_KEY) or None,
    )
