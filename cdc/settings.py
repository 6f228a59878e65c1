"""Configuration: the name of every environment variable the platform reads, and `Settings`, read once.

Production sets these variables (secrets from its secret store); locally `cdc stack env` prints them for the
running local stack, and a process started without them falls back to the local stack's state file, so
`cdc stack up && cdc workload ...` works without an `eval`. Nothing reads a variable at import time:
`Settings.load()` is called where a process starts (a command, a Dagster definitions load, a run) and the object
is passed on. See docs/configuration.md for each variable.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
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

# BigQuery side: the endpoints are only set locally (the BigQuery API server); production uses Google's.
BIGQUERY_PROJECT = "CDC_BIGQUERY_PROJECT"
BIGQUERY_ENDPOINT = "CDC_BIGQUERY_ENDPOINT"
BIGQUERY_WRITE_ENDPOINT = (
    "CDC_BIGQUERY_WRITE_ENDPOINT"  # host:port of a local Storage Write API (gRPC, no TLS)
)
BIGQUERY_LOCATION = "CDC_BIGQUERY_LOCATION"

# How tables load: `streaming` (Storage Write API + BigQuery's native CDC) or `batch` (load job + MERGE), for the
# tables whose mapping does not say; and the max_staleness of streaming current-state tables (0 = always fresh).
LOAD_MODE = "CDC_LOAD_MODE"
MAX_STALENESS_MINUTES = "CDC_MAX_STALENESS_MINUTES"
# Streaming-mode tables load in a standing stream run of this many minutes (default 5; the next one takes over before
# it ends: no run to create or start per load), or 0: a load run per batch of files (docs/design.md, "Stream runs").
STREAM_RUN_MINUTES = "CDC_STREAM_RUN_MINUTES"

# BigQuery load-job budget of batch-mode tables (BigQuery's fixed limits: 1,500 per table per day, failed ones
# included; 100,000 per project per day). The defaults keep a reserve for retries and backfills.
MAX_LOAD_JOBS_PER_TABLE_PER_DAY = "CDC_MAX_LOAD_JOBS_PER_TABLE_PER_DAY"
MAX_LOAD_JOBS_PER_PROJECT_PER_DAY = "CDC_MAX_LOAD_JOBS_PER_PROJECT_PER_DAY"

# Check thresholds and the loader's parallelism.
LOAD_GRACE_SECONDS = "CDC_LOAD_GRACE_SECONDS"
# content_matches_source: WARN (default) or ERROR, and the rows one check run compares at most on a table without
# a partition column (bigger tables are compared a window of key ranges per run, a different one each time)
CONTENT_CHECK_SEVERITY = "CDC_CONTENT_CHECK_SEVERITY"
CONTENT_CHECK_MAX_ROWS = "CDC_CONTENT_CHECK_MAX_ROWS"
# The table checks run a few tables at a time, one run a minute, so that every table is checked once per cycle.
TABLE_CHECKS_CYCLE_MINUTES = "CDC_TABLE_CHECKS_CYCLE_MINUTES"
FRESHNESS_WARN_MINUTES = "CDC_FRESHNESS_WARN_MINUTES"
FRESHNESS_FAIL_MINUTES = "CDC_FRESHNESS_FAIL_MINUTES"
MAX_PARALLEL_LOADS = "CDC_MAX_PARALLEL_LOADS"
PARTITIONS_START = "CDC_PARTITIONS_START"

# Alerts: a Slack-compatible incoming-webhook URL (a secret: environment only). Unset = alerts are only logged.
ALERT_WEBHOOK_URL = "CDC_ALERT_WEBHOOK_URL"

# The Dagster instance file `cdc dagster start` runs with (default deploy/local/dagster.yaml: SQLite storage);
# deploy/postgres/dagster.yaml stores in PostgreSQL and reads DAGSTER_PG_HOST/PORT/USERNAME/PASSWORD/DB.
DAGSTER_INSTANCE_YAML = "CDC_DAGSTER_INSTANCE_YAML"

DEFAULT_LANDING_PREFIX = "cdc"
LOAD_MODES = ("streaming", "batch")


class SettingError(RuntimeError):
    """A variable set to something the platform cannot use; the message names it and what is allowed."""


@dataclass(frozen=True)
class Settings:
    """Every value the platform reads from its environment, parsed and checked once."""

    mappings_dir: Path
    state_dir: Path
    landing_bucket: str = ""
    landing_prefix: str = DEFAULT_LANDING_PREFIX
    sqs_queue_url: str = ""
    sqs_dlq_url: str = ""
    aws_endpoint_url: str = ""
    bigquery_project: str = ""
    bigquery_endpoint: str = ""
    bigquery_write_endpoint: str = ""
    bigquery_location: str = ""
    load_mode: str = "streaming"
    max_staleness_minutes: float = 0.0
    stream_run_minutes: float = 15.0
    max_load_jobs_per_table_per_day: int = 1_200
    max_load_jobs_per_project_per_day: int = 90_000
    load_grace_seconds: float = 300.0
    content_check_severity: str = "WARN"
    content_check_max_rows: int = 200_000
    table_checks_cycle_minutes: int = 10
    freshness_warn_minutes: float = 30.0
    freshness_fail_minutes: float = 120.0
    max_parallel_loads: int = 8
    partitions_start: str = "2026-01-01"
    alert_webhook_url: str = field(default="", repr=False)  # a secret
    values: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of this process: its environment layered over the running local stack's values."""
        values = resolved(environ)
        text = values.get
        return cls(
            mappings_dir=Path(text(MAPPINGS_DIR) or PROJECT_ROOT / "mappings"),
            state_dir=Path(text(STATE_DIR) or PROJECT_ROOT / ".state"),
            landing_bucket=text(LANDING_BUCKET, ""),
            landing_prefix=text(LANDING_PREFIX) or DEFAULT_LANDING_PREFIX,
            sqs_queue_url=text(SQS_QUEUE_URL, ""),
            sqs_dlq_url=text(SQS_DLQ_URL, ""),
            aws_endpoint_url=text(AWS_ENDPOINT_URL, ""),
            bigquery_project=text(BIGQUERY_PROJECT, ""),
            bigquery_endpoint=text(BIGQUERY_ENDPOINT, ""),
            bigquery_write_endpoint=text(BIGQUERY_WRITE_ENDPOINT, ""),
            bigquery_location=text(BIGQUERY_LOCATION, ""),
            load_mode=_choice(values, LOAD_MODE, "streaming", LOAD_MODES),
            max_staleness_minutes=_number(values, MAX_STALENESS_MINUTES, 0.0, 0.0, 1440.0),
            stream_run_minutes=_number(values, STREAM_RUN_MINUTES, 15.0, 0.0, 120.0),
            max_load_jobs_per_table_per_day=_integer(
                values, MAX_LOAD_JOBS_PER_TABLE_PER_DAY, 1_200, 1, 1_500
            ),
            max_load_jobs_per_project_per_day=_integer(
                values, MAX_LOAD_JOBS_PER_PROJECT_PER_DAY, 90_000, 1, 100_000
            ),
            load_grace_seconds=_number(values, LOAD_GRACE_SECONDS, 300.0, 0.0, 86_400.0),
            content_check_severity=_choice(values, CONTENT_CHECK_SEVERITY, "WARN", ("WARN", "ERROR")),
            content_check_max_rows=_integer(values, CONTENT_CHECK_MAX_ROWS, 200_000, 100_000, 1_000_000_000),
            table_checks_cycle_minutes=_integer(values, TABLE_CHECKS_CYCLE_MINUTES, 10, 1, 1_440),
            freshness_warn_minutes=_number(values, FRESHNESS_WARN_MINUTES, 30.0, 1.0, 10_080.0),
            freshness_fail_minutes=_number(values, FRESHNESS_FAIL_MINUTES, 120.0, 1.0, 10_080.0),
            max_parallel_loads=_integer(values, MAX_PARALLEL_LOADS, 8, 1, 256),
            partitions_start=text(PARTITIONS_START) or "2026-01-01",
            alert_webhook_url=text(ALERT_WEBHOOK_URL, ""),
            values=values,
        )

    def require(self, name: str) -> str:
        """The value of variable `name` (e.g. a cluster connection variable a mapping names), or a clear error."""
        return require(name, self.values)

    @property
    def deployed_mappings_dir(self) -> Path:
        """The mappings the running local platform reads (capture and Dagster): published by `cdc mappings deploy`
        (and by `cdc capture start` / `cdc dagster start`) only once every file is valid."""
        return self.state_dir / "mappings"


def _number(values: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    text = values.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise SettingError(f"{name}={text!r} is not a number; set {low:g}..{high:g}") from None
    if not low <= value <= high:
        raise SettingError(f"{name}={text} is outside {low:g}..{high:g}")
    return value


def _integer(values: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = values.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SettingError(f"{name}={text!r} is not a whole number; set {low}..{high}") from None
    if not low <= value <= high:
        raise SettingError(f"{name}={value} is outside {low}..{high}")
    return value


def _choice(values: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = values.get(name, "").strip() or default
    if value not in allowed:
        raise SettingError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    return value


def mappings_dir() -> Path:
    return Path(os.environ.get(MAPPINGS_DIR) or PROJECT_ROOT / "mappings")


def deployed_mappings_dir() -> Path:
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
        raise SettingError(
            f'environment variable {name} is not set. Locally, run `cdc stack up` (or `eval "$(cdc stack env)"`); '
            "in production, set it in the deployment's environment."
        )
    return value


def installed_command(name: str) -> str:
    """A console script installed beside this interpreter (`cdc`, `dagster`, ...), by absolute path."""
    return str(Path(sys.executable).with_name(name))
