"""Helpers for capture tests: run a capture in a thread, read its Parquet back, and the source's own text oracle."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pyarrow.parquet as pq
import pymysql

from capture import layout
from capture.service import CaptureSettings, ClusterCapture, MySQLConnection
from capture.sink import S3Store
from cdc.clients import aws_client
from cdc.mappings import ClusterMapping, TableMapping
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
    prefix = layout.table_prefix(env.prefix, env.schema, table)
    rows: list[dict[str, Any]] = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=env.stack.settings.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=env.stack.settings.bucket, Key=item["Key"])["Body"].read()
            for row in pq.read_table(io.BytesIO(body)).to_pylist():
                rows.append({**row, "_key": item["Key"]})
    return rows


def final_state(rows: list[dict[str, Any]], key: list[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Apply changes in change-sequence order (duplicates collapse), as the loader will."""
    state: dict[tuple[Any, ...], dict[str, Any]] = {}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r[layout.CHANGE_SEQUENCE_COLUMN], r[layout.OP_COLUMN] != "D")):
        identity = (row[layout.CHANGE_SEQUENCE_COLUMN], row[layout.OP_COLUMN])
        payload = {k: v for k, v in row.items() if k not in ("_key", layout.COMMIT_TIMESTAMP_COLUMN)}
        if identity in seen:
            assert seen[identity] == payload, f"replayed change differs: {seen[identity]} vs {payload}"
            continue
        seen[identity] = payload
        pk = tuple(row[c] for c in key)
        if row[layout.OP_COLUMN] == "D":
            state.pop(pk, None)
        else:
            state[pk] = {k: v for k, v in payload.items() if k not in layout.ADDED_COLUMNS}
    return state


def as_text(value: Any, column_type: str) -> str | None:
    """A Parquet value rendered the way MySQL renders the source value (the oracle's side of the comparison)."""
    if value is None:
        return None
    column_type.split("(")[0].split()[0]
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, bytes):
        return value.hex().upper()
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dt.datetime):
        fsp = int(column_type.split("(")[1].rstrip(")")) if "(" in column_type else 0
        text = value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value
        rendered = text.strftime("%Y-%m-%d %H:%M:%S")
        return rendered + ("." + f"{text.microsecond:06d}"[:fsp] if fsp else "")
    if isinstance(value, dt.date):
        return value.isoformat()
    return json_canonical(str(value))


def json_canonical(text: str) -> str:
    """JSON documents compare by content (MariaDB keeps the text as written); other text is left alone."""
    if text[:1] in ("{", "["):
        try:
            return json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False)
        except ValueError:
            return text
    return text


def oracle_expression(name: str, column_type: str) -> str:
    """SQL that renders a source column as text comparable with `as_text` (zero dates become NULL, as DMS does)."""
    kind = column_type.split("(")[0].split()[0]
    col = f"`{name}`"
    if kind == "bit":
        width = int(column_type.split("(")[1].rstrip(")"))
        return (
            f"CAST({col} + 0 AS CHAR)" if width == 1 else f"LPAD(HEX({col}), {2 * ((width + 7) // 8)}, '0')"
        )
    if kind in ("binary", "varbinary", "blob", "tinyblob", "mediumblob", "longblob"):
        return f"HEX({col})"
    if kind in ("date", "datetime", "timestamp"):
        return f"IF(CAST({col} AS CHAR) LIKE '0000%' OR CAST({col} AS CHAR) LIKE '%-00%', NULL, CAST({col} AS CHAR))"
    return f"CAST({col} AS CHAR)"


def source_text_rows(
    env: CaptureEnv, table: str, key: list[str]
) -> tuple[dict[tuple[str, ...], dict[str, Any]], dict[str, str]]:
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT COLUMN_NAME, LOWER(COLUMN_TYPE) FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (env.schema, table),
        )
        types = dict(cursor.fetchall())
        cursor.execute(
            "SELECT "
            + ", ".join(oracle_expression(n, t) for n, t in types.items())
            + f" FROM `{env.schema}`.`{table}`"
        )
        rows = [dict(zip(types, row, strict=True)) for row in cursor.fetchall()]
    normalised = {}
    for row in rows:
        for name, column_type in types.items():
            if isinstance(row[name], str):
                row[name] = json_canonical(row[name])
            if row[name] is not None and column_type.split("(")[0] in ("double", "float"):
                row[name] = repr(float(row[name]))
        normalised[tuple(str(row[k]) for k in key)] = row
    return normalised, types


def compare_with_source(env: CaptureEnv, table: str, key: list[str]) -> int:
    """Assert the state rebuilt from the landed files equals the source table value for value; return rows."""
    expected, types = source_text_rows(env, table, key)
    state = final_state(landed_rows(env, table), key)
    actual = {
        tuple(str(v) for v in pk): {n: as_text(row.get(n), t) for n, t in types.items()}
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
    prefix = layout.table_prefix(env.prefix, env.schema, table)
    pages = (
        env.s3().get_paginator("list_objects_v2").paginate(Bucket=env.stack.settings.bucket, Prefix=prefix)
    )
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def pipeline_resources(env: CaptureEnv) -> dict[str, Any]:
    """The Dagster resources of the pipeline, pointed at the env's landing prefix and the stack's servers."""
    from cdc_assets.resources import BigQueryCdcResource, LandingResource, MySqlSourceResource

    stack = env.stack
    return {
        "landing": LandingResource(bucket=stack.settings.bucket, prefix=env.prefix),
        "bigquery": BigQueryCdcResource(
            project=stack.settings.bigquery_project, endpoint=stack.bigquery.endpoint
        ),
        "mysql": MySqlSourceResource(),
    }
