"""A test's capture surroundings: a private schema on a cluster of the session's stack and a private landing
prefix; running a capture in a thread; reading its Parquet back; comparing it with the source (cdc_testing.oracle)."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pymysql

from capture.service import CaptureSettings, ClusterCapture
from capture.sink import S3Store
from cdc.clients import aws_client
from cdc.landing import table_prefix
from cdc.mappings import ClusterMapping, TableMapping
from cdc.source import MySQLConnection
from cdc_testing import oracle
from local_stack.stack import LocalStack

FAST = CaptureSettings(
    flush_interval_s=0.3,
    flush_rows=20_000,
    heartbeat_s=0.3,
    status_interval_s=0.5,
    mapping_check_interval_s=0.5,
)


@dataclass
class CaptureEnv:
    """One test's capture surroundings: a cluster of the session stack, a private landing prefix."""

    stack: LocalStack
    cluster_name: str
    schema: str
    prefix: str

    def admin(self) -> pymysql.connections.Connection:
        user, password = self.stack.admin_credentials(self.cluster_name)
        connection = self.stack.mariadb(self.cluster_name).connect(user, password)
        connection.autocommit(True)
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION time_zone = '+00:00'")
        return connection

    def replication(self) -> MySQLConnection:
        server = self.stack.mariadb(self.cluster_name)
        return MySQLConnection("127.0.0.1", server.port, "cdc_replicator", server.replication_password)

    def store(self) -> S3Store:
        return S3Store(self.s3(), self.stack.settings.bucket, self.prefix)

    def s3(self) -> Any:
        return aws_client("s3", self.stack.environment())

    def mapping(self, *tables: TableMapping) -> ClusterMapping:
        name = self.cluster_name.upper()
        return ClusterMapping.model_validate(
            {
                "cluster": self.cluster_name,
                "connection": {
                    "host_env": f"CDC_MYSQL_{name}_HOST",
                    "port_env": f"CDC_MYSQL_{name}_PORT",
                    "user_env": f"CDC_MYSQL_{name}_USER",
                    "password_env": f"CDC_MYSQL_{name}_PASSWORD",
                },
                "tables": [t.model_dump() for t in tables],
            }
        )

    def table(self, name: str, primary_key: list[str], **extra: Any) -> TableMapping:
        return TableMapping(
            source=f"{self.schema}.{name}", target=f"{self.schema}.{name}", primary_key=primary_key, **extra
        )


def run_sql(env: CaptureEnv, *statements: str) -> None:
    """Run statements as the test's admin, with `{schema}` replaced by the test's schema (zero dates allowed)."""
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute("SET SESSION sql_mode = 'NO_ENGINE_SUBSTITUTION'")
        for statement in statements:
            cursor.execute(statement.format(schema=env.schema))


def new_env(stack: LocalStack, cluster: str) -> CaptureEnv:
    token = uuid.uuid4().hex[:8]
    env = CaptureEnv(stack, cluster, f"captest_{token}", f"captest-{token}")
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{env.schema}` CHARACTER SET utf8mb4")
    return env


@contextmanager
def in_thread(target: Callable[[], None], stop: Callable[[], None], join_timeout: float) -> Iterator[None]:
    """Run `target` in a daemon thread for the block; on leaving, `stop()` it and join. A failure of the thread is
    raised - also when the block failed, as its cause (a wait that timed out is usually its symptom)."""
    failure: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    try:
        yield
    except BaseException as exc:
        if failure:
            raise failure[0] from exc
        raise
    finally:
        stop()
        thread.join(timeout=join_timeout)
    if failure:
        raise failure[0]


@contextmanager
def running(capture: ClusterCapture) -> Iterator[ClusterCapture]:
    with in_thread(capture.run, capture.stop, join_timeout=60):
        yield capture


def source_gtid(env: CaptureEnv) -> str:
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT @@gtid_binlog_pos")
        return str(cursor.fetchone()[0])


def wait_caught_up(env: CaptureEnv, timeout: float = 60) -> dict[str, Any]:
    """Wait until the capture's checkpoint (in S3) reaches the source's current GTID."""
    target = source_gtid(env)
    store = env.store()
    deadline = time.monotonic() + timeout
    checkpoint: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        checkpoint = store.read_json("checkpoints", env.cluster_name)
        if checkpoint and set(checkpoint.get("gtid", "").split(",")) >= set(target.split(",")):
            return checkpoint
        time.sleep(0.2)
    raise AssertionError(f"capture did not catch up with {target}; checkpoint {checkpoint}")


def landed_rows(env: CaptureEnv, table: str) -> list[dict[str, Any]]:
    """Every row of every file of ``table`` (full load and CDC), with the file key, in file order."""
    s3 = env.s3()
    prefix = table_prefix(env.prefix, env.schema, table)
    rows: list[dict[str, Any]] = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=env.stack.settings.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=env.stack.settings.bucket, Key=item["Key"])["Body"].read()
            for row in pq.read_table(io.BytesIO(body)).to_pylist():
                rows.append({**row, "_key": item["Key"]})
    return rows


def source_text_rows(
    env: CaptureEnv, table: str, key: list[str]
) -> tuple[dict[tuple[str, ...], dict[str, Any]], dict[str, str]]:
    """The source table as the oracle renders it: (rows by key text, column types)."""
    with env.admin() as connection, connection.cursor() as cursor:
        return oracle.source_rows(cursor, env.schema, table, key)


def compare_with_source(env: CaptureEnv, table: str, key: list[str]) -> int:
    """Assert the state rebuilt from the landed files equals the source table value for value; return rows."""
    expected, types = source_text_rows(env, table, key)
    state = oracle.final_state(landed_rows(env, table), key)
    actual = {
        tuple(oracle.key_text(v) for v in pk): {n: oracle.as_text(row.get(n), t) for n, t in types.items()}
        for pk, row in state.items()
    }
    assert set(actual) == set(expected), (
        f"keys differ: missing {sorted(set(expected) - set(actual))[:5]}, extra {sorted(set(actual) - set(expected))[:5]}"
    )
    for pk, row in expected.items():
        assert actual[pk] == row, f"{table} {pk}: landed {actual[pk]} != source {row}"
    return len(expected)


def capture_changes(env: CaptureEnv, cluster: ClusterMapping, *statements: str) -> None:
    """Capture `cluster` into the env's landing prefix: its full load, then `statements`, until caught up."""
    with running(ClusterCapture(cluster, env.replication(), env.store(), FAST)):
        wait_caught_up(env)
        if statements:
            run_sql(env, *statements)
            wait_caught_up(env)


def landed_keys(env: CaptureEnv, table: str) -> set[str]:
    """Every key landed for `table` under the env's prefix (full load and CDC)."""
    prefix = table_prefix(env.prefix, env.schema, table)
    pages = (
        env.s3().get_paginator("list_objects_v2").paginate(Bucket=env.stack.settings.bucket, Prefix=prefix)
    )
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def write_mapping(env: CaptureEnv, folder: Path, cluster: str, tables: list[str]) -> None:
    """A mapping file of the env's `tables` (primary key `id`) for `cluster` in `folder`."""
    folder.mkdir(exist_ok=True)
    mapping = env.mapping(*[env.table(t, ["id"]) for t in tables]).model_copy(update={"cluster": cluster})
    (folder / f"{cluster}.json").write_text(mapping.model_dump_json(by_alias=True, exclude_none=True))


def landing_resource(stack: LocalStack, prefix: str, **queues: str) -> Any:
    """The landing resource on the stack's moto server, for a test's own prefix (and queues, when given)."""
    from cdc_assets.resources import LandingResource

    environ = stack.environment()
    return LandingResource(
        bucket=stack.settings.bucket,
        prefix=prefix,
        endpoint_url=environ["AWS_ENDPOINT_URL"],
        region_name=environ["AWS_REGION"],
        aws_access_key_id=environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=environ["AWS_SECRET_ACCESS_KEY"],
        **queues,
    )


def notified_landing(stack: LocalStack) -> Any:
    """The landing resource on the notified prefix, with the stack's event queue and its dead-letter queue."""
    environ = stack.environment()
    return landing_resource(
        stack,
        stack.settings.prefix,
        queue_url=environ["CDC_SQS_QUEUE_URL"],
        dead_letter_queue_url=environ["CDC_SQS_DLQ_URL"],
    )


def pipeline_resources(env: CaptureEnv) -> dict[str, Any]:
    """The Dagster resources of the pipeline, pointed at the env's landing prefix and the stack's servers."""
    from cdc_assets.resources import BigQueryCdcResource, MySqlSourceResource

    stack = env.stack
    return {
        "landing": landing_resource(stack, env.prefix),
        "bigquery": BigQueryCdcResource(
            project=stack.settings.bigquery_project,
            endpoint=stack.bigquery.endpoint,
            write_endpoint=stack.bigquery.write_endpoint,
        ),
        "mysql": MySqlSourceResource(),
    }


def drain_queue(sqs: Any, queue: str) -> list[dict[str, Any]]:
    """Delete whatever is visible in `queue` (PurgeQueue is limited to once a minute, as on AWS): other tests'
    messages are not this test's business. The messages deleted, with their attributes."""
    messages = []
    while batch := sqs.receive_message(
        QueueUrl=queue, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    ).get("Messages"):
        for message in batch:
            messages.append(message)
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    return messages


def run_requested_resnapshots(cluster: ClusterMapping, resources: dict[str, Any], instance: Any) -> list[Any]:
    """What the `resnapshot_requests` sensor asks for, run as the daemon would: the run requests, each run a
    success."""
    import dagster as dg

    from cdc.mappings import Mappings
    from cdc.settings import Settings
    from cdc_assets.resnapshot import build_resnapshot_job
    from sensors.resnapshot_requests import build_resnapshot_request_sensor

    mappings = Mappings(Path("."), (cluster,))
    context = dg.build_sensor_context(instance=instance, resources={"landing": resources["landing"]})
    requests = [r for r in build_resnapshot_request_sensor(mappings)(context) if isinstance(r, dg.RunRequest)]
    job = build_resnapshot_job(mappings, Settings.load())
    for request in requests:
        result = job.execute_in_process(run_config=request.run_config, resources=resources, instance=instance)
        assert result.success
    return requests
