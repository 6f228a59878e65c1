"""The `accounts` test table: a row of every awkward type, its captured changes loaded into BigQuery, and the
assertions the loader tests share (current state equal to the source value for value; no change twice)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cdc.clients import bigquery_client, bigquery_write_client
from cdc.landing import ControlDocuments
from cdc_assets.batch_loader import MergeLoader
from cdc_assets.landed_files import read_landed
from cdc_assets.stream_loader import STATE_ROOT, StreamLoader, StreamResult
from cdc_assets.targets import CHANGE_SEQ, OP
from cdc_testing import oracle
from local_stack.stack import LocalStack
from tests.support.capture import CaptureEnv, run_sql, source_text_rows

DDL = """CREATE TABLE `{schema}`.accounts (
  id BIGINT UNSIGNED NOT NULL PRIMARY KEY, big BIGINT UNSIGNED NULL, n INT NULL, money DECIMAL(18,4) NULL,
  nick VARCHAR(32) CHARACTER SET utf8mb4 NULL, at DATETIME(6) NULL, ts TIMESTAMP(6) NULL DEFAULT NULL, day DATE NULL,
  b1 BIT(1) NULL, vip TINYINT(1) NULL, opts SET('x','y') NULL, t TIME(6) NULL, raw VARBINARY(8) NULL, doc JSON NULL)"""


def account_row(i: int) -> str:
    return (
        f"({i}, {18446744073709551615 - i}, {i * 7}, {i}.2500, 'p{i} 🎲', '2026-11-25 10:00:00.{i:06d}', "
        f"'2026-11-25 11:00:00.000001', '2026-11-{1 + i % 28:02d}', b'{i % 2}', {i % 2}, '{'x' if i % 2 else ''}', "
        f"'-00:00:00.000001', X'00{i % 256:02X}', '{{\"i\": {i}}}')"
    )


def insert_accounts(env: CaptureEnv, ids: Iterable[int]) -> None:
    """INSERT the test rows `account_row(i)` for `ids` into the env's accounts table."""
    rows = (
        ", ".join(account_row(i) for i in ids).replace("{", "{{").replace("}", "}}")
    )  # run_sql formats {schema}
    run_sql(env, f"INSERT INTO `{env.schema}`.accounts VALUES {rows}")


def accounts_loader(local_stack: LocalStack, env: CaptureEnv, dataset: str) -> MergeLoader:
    """A batch-mode loader of the env's accounts table into `dataset` (TINYINT(1) vip as BOOL)."""
    bq = bigquery_client(local_stack.settings.bigquery_project, endpoint=local_stack.bigquery.endpoint)
    mapping = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}).model_copy(
        update={"target": f"{dataset}.accounts"}
    )
    return MergeLoader(bq, mapping)


def load_files(loader: MergeLoader, env: CaptureEnv, keys: list[str]) -> Any:
    """Load the files as the table asset does (their ETags in the batch's identity)."""
    versions: dict[str, str] = {}
    data = read_landed(env.s3(), env.stack.settings.bucket, keys, versions=versions)
    assert data is not None
    return loader.load(data, keys, versions=versions)


def assert_current_state_equals_source(loader: Any, env: CaptureEnv) -> None:
    expected, types = source_text_rows(env, "accounts", ["id"])
    rows = loader.bq.query(f"SELECT * FROM {loader.ref('accounts')}").result()
    actual = oracle.rendered_rows(rows, types, ["id"])
    assert set(actual) == set(expected)
    for key, row in expected.items():
        for name in types:
            assert oracle.same(row[name], actual[key][name]), (
                f"id {key} column {name}: source {row[name]!r}, BigQuery {actual[key][name]!r}"
            )


def assert_changelog_has_no_duplicates(loader: Any) -> int:
    sql = (
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT CONCAT(`{CHANGE_SEQ}`, `{OP}`)) AS d "
        f"FROM {loader.ref('accounts_changelog')}"
    )
    row = next(iter(loader.bq.query(sql).result()))
    assert row.n == row.d, f"{row.n - row.d} duplicate changes in the changelog"
    return int(row.n)


def accounts_stream_loader(local_stack: LocalStack, env: CaptureEnv, dataset: str) -> StreamLoader:
    """A streaming-mode loader of the env's accounts table into `dataset` (its state beside the env's prefix)."""
    bq = bigquery_client(local_stack.settings.bigquery_project, endpoint=local_stack.bigquery.endpoint)
    mapping = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}).model_copy(
        update={"target": f"{dataset}.accounts"}
    )
    control = ControlDocuments(env.s3(), local_stack.settings.bucket, env.prefix, root=STATE_ROOT)
    return StreamLoader(bq, bigquery_write_client(local_stack.bigquery.write_endpoint), mapping, control)


def stream_all(loader: StreamLoader, env: CaptureEnv, named: Iterable[str] = ()) -> StreamResult:
    """Load the env's files not read yet (and the named ones, where late) as the table asset does."""
    return loader.load(env.s3(), env.stack.settings.bucket, env.prefix, list(named))
