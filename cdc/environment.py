"""Configuration from the environment: the names of every variable the platform reads, in one place.

Production sets these variables (secrets from its secret store); locally `cdc stack env` prints them for the
running local stack. A `cdc` command run without them falls back to the local stack's state file, so
`cdc stack up && cdc workload ...` works without an `eval`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

MAPPINGS_DIR = "CDC_MAPPINGS_DIR"
STATE_DIR = "CDC_STATE_DIR"

# AWS side: boto3 reads AWS_ENDPOINT_URL / AWS_REGION / AWS credentials itself; production leaves the
# endpoint unset so boto3 talks to real AWS.
AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
AWS_REGION = "AWS_REGION"
AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
LANDING_BUCKET = "CDC_LANDING_BUCKET"
LANDING_PREFIX = "CDC_LANDING_PREFIX"
SQS_QUEUE_URL = "CDC_SQS_QUEUE_URL"
SQS_DLQ_URL = "CDC_SQS_DLQ_URL"

# BigQuery side: the endpoint is only set locally (the BigQuery API server); production uses Google's.
BIGQUERY_PROJECT = "CDC_BIGQUERY_PROJECT"
BIGQUERY_ENDPOINT = "CDC_BIGQUERY_ENDPOINT"
BIGQUERY_LOCATION = "CDC_BIGQUERY_LOCATION"

# BigQuery load-job budget (BigQuery's fixed limits: 1,500 per table per day, failed ones included; 100,000 per
# project per day). The defaults keep a reserve for retries and backfills.
MAX_LOAD_JOBS_PER_TABLE_PER_DAY = "CDC_MAX_LOAD_JOBS_PER_TABLE_PER_DAY"
MAX_LOAD_JOBS_PER_PROJECT_PER_DAY = "CDC_MAX_LOAD_JOBS_PER_PROJECT_PER_DAY"

# Alerts: a Slack-compatible incoming-webhook URL (a secret: environment only). Unset = alerts are only logged.
ALERT_WEBHOOK_URL = "CDC_ALERT_WEBHOOK_URL"

# The Dagster instance file `cdc dagster start` runs with (default deploy/local/dagster.yaml: SQLite storage);
# deploy/postgres/dagster.yaml stores in PostgreSQL and reads DAGSTER_PG_HOST/PORT/USERNAME/PASSWORD/DB.
DAGSTER_INSTANCE_YAML = "CDC_DAGSTER_INSTANCE_YAML"

DEFAULT_LANDING_PREFIX = "cdc"


def mappings_dir() -> Path:
    return Path(os.environ.get(MAPPINGS_DIR) or PROJECT_ROOT / "mappings")


def deployed_mappings_dir() -> Path:
    """The mappings the running local platform reads (capture and Dagster): published by `cdc mappings deploy`
    (and by `cdc capture start` / `cdc dagster start`) only once every file is valid."""
    return state_dir() / "mappings"


def state_dir() -> Path:
    """The one git-ignored folder that holds all runtime state (server data, logs, DAGSTER_HOME)."""
    return Path(os.environ.get(STATE_DIR) or PROJECT_ROOT / ".state")


def stack_state_file() -> Path:
    return state_dir() / "stack.json"


def local_stack_values() -> dict[str, str]:
    """The environment the running local stack provides, or {} when no stack has been brought up."""
    path = stack_state_file()
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in data.get("env", {}).items()}


def resolved(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment layered over the local stack's values (the environment always wins)."""
    values = local_stack_values()
    values.update(os.environ if environ is None else environ)
    return values


def require(name: str, environ: Mapping[str, str] | None = None) -> str:
    values = resolved(environ)
    value = values.get(name)
    if not value:
        raise RuntimeError(
            f'environment variable {name} is not set. Locally, run `cdc stack up` (or `eval "$(cdc stack env)"`); '
            "in production, set it in the deployment's environment."
        )
    return value
