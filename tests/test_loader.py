"""The loader against the BigQuery API server: changelog exactly once, current state equal to the source."""

from __future__ import annotations

import io
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import pytest
from google.api_core import exceptions
from google.cloud import bigquery

from capture import layout
from capture.service import ClusterCapture
from cdc.clients import bigquery_client
from cdc_assets.loader import CHANGE_SEQ, MAX_ATTEMPTS, OP, TableLoader, batch_id, read_landed
from local_stack.stack import LocalStack
from tests.capture_support import (
    FAST,
    CaptureEnv,
    as_text,
    landed_keys,
    new_env,
    run_sql,
    running,
    source_text_rows,
    wait_caught_up,
)

DDL = """CREATE TABLE `{schema}`.accounts (
  id BIGINT UNSIGNED NOT NULL PRIMARY KEY, big BIGINT UNSIGNED NULL, n INT NULL, money DECIMAL(18,4) NULL,
  nick VARCHAR(32) CHARACTER SET utf8mb4 NULL, at DATETIME(6) NULL, ts TIMESTAMP(6) NULL DEFAULT NULL, day DATE NULL,
  b1 BIT(1) NULL, vip TINYINT(1) NULL, opts SET('x','y') NULL, t TIME(6) NULL, raw VARBINARY(8) NULL, doc JSON NULL)"""


def _row(i: int) -> str:
    return (
        f"({i}, {18446744073709551615 - i}, {i * 7}, {i}.2500, 'p{i} 🎲', '2026-11-25 10:00:00.{i:06d}', "
        f"'2026-11-25 11:00:00.000001', '2026-11-{1 + i % 28:02d}', b'{i % 2}', {i % 2}, '{'x' if i % 2 else ''}', "
        f"'-00:00:00.000001', X'00{i % 256:02X}', '{{\"i\": {i}}}')"
    )


def insert_accounts(env: CaptureEnv, ids: Iterable[int]) -> None:
    """INSERT the test rows `_row(i)` for `ids` into the env's accounts table."""
    rows = ", ".join(_row(i) for i in ids).replace("{", "{{").replace("}", "}}")  # run_sql formats {schema}
    run_sql(env, f"INSERT INTO `{env.schema}`.accounts VALUES {rows}")


@pytest.fixture(scope="module")
def landed(local_stack: LocalStack) -> tuple[CaptureEnv, list[str]]:
    """Captured changes of one table: a full load, then inserts, updates, a key change and deletes."""
    env = new_env(local_stack, "slots_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 6))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"})
    with running(ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)):
        wait_caught_up(env)
        insert_accounts(env, range(6, 11))
        wait_caught_up(env)
        run_sql(
            env,
            "UPDATE `{schema}`.accounts SET money = money * 2, nick = 'renamed 🎉' WHERE id IN (2, 7)",
            "UPDATE `{schema}`.accounts SET id = 100 WHERE id = 3",  # a key change
            "DELETE FROM `{schema}`.accounts WHERE id IN (4, 8)",
            "UPDATE `{schema}`.accounts SET opts = '', t = '838:59:59' WHERE id = 1",
        )
        wait_caught_up(env)
    s3 = env.s3()
    prefix = layout.table_prefix(env.prefix, env.schema, "accounts")
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=local_stack.settings.bucket, Prefix=prefix)["Contents"]
    )
    assert len(keys) >= 3
    return env, keys


def _loader(local_stack: LocalStack, env: CaptureEnv, dataset: str) -> TableLoader:
    bq = bigquery_client(local_stack.settings.bigquery_project, endpoint=local_stack.bigquery.endpoint)
    mapping = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}).model_copy(
        update={"target": f"{dataset}.accounts"}
    )
    return TableLoader(bq, mapping)


def _load(loader: TableLoader, env: CaptureEnv, keys: list[str]) -> Any:
    """Load the files as the table asset does (their ETags in the batch's identity)."""
    versions: dict[str, str] = {}
    data = read_landed(env.s3(), env.stack.settings.bucket, keys, versions=versions)
    assert data is not None
    return loader.load(data, keys, versions=versions)


def _same(expected: Any, actual: Any) -> bool:
    if expected == actual:
        return True
    try:
        return Decimal(str(expected)) == Decimal(str(actual))
    except (InvalidOperation, TypeError):
        return False


def assert_current_state_equals_source(loader: TableLoader, env: CaptureEnv) -> None:
    expected, types = source_text_rows(env, "accounts", ["id"])
    rows = loader.bq.query(f"SELECT * FROM {loader.ref('accounts')}").result()
    actual = {(str(int(r["id"])),): {n: as_text(r[n], t) for n, t in types.items()} for r in rows}
    assert set(actual) == set(expected)
    for key, row in expected.items():
        for name in types:
            assert _same(row[name], actual[key][name]), (
                f"id {key} column {name}: source {row[name]!r}, BigQuery {actual[key][name]!r}"
            )


def assert_changelog_has_no_duplicates(loader: TableLoader) -> int:
    sql = (
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT CONCAT(`{CHANGE_SEQ}`, `{OP}`)) AS d "
        f"FROM {loader.ref('accounts_changelog')}"
    )
    row = next(iter(loader.bq.query(sql).result()))
    assert row.n == row.d, f"{row.n - row.d} duplicate changes in the changelog"
    return int(row.n)


def test_overlapping_and_repeated_batches_load_each_change_once(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = _loader(local_stack, env, "loader_overlap")
    half = keys[: len(keys) // 2]
    first = _load(loader, env, half)
    assert first.inserted_changes == first.rows
    everything = _load(loader, env, keys)  # redelivery of the first half together with the rest
    assert everything.inserted_changes == everything.rows - first.rows
    again = _load(loader, env, keys)  # the same batch once more: its jobs already ran
    assert again.inserted_changes == 0
    total = assert_changelog_has_no_duplicates(loader)
    assert total == everything.rows
    assert_current_state_equals_source(loader, env)


def test_out_of_order_files_never_regress_the_current_state(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = _loader(local_stack, env, "loader_out_of_order")
    for key in reversed(keys):  # newest file first, the full load last
        _load(loader, env, [key])
    assert_changelog_has_no_duplicates(loader)
    assert_current_state_equals_source(loader, env)


def test_a_failed_first_job_is_retried_under_a_new_id(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = _loader(local_stack, env, "loader_retry")
    loader.bq.create_dataset("loader_retry", exists_ok=True)
    broken = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET)
    # The batch's first job ids fail - as often as one load call tries, as if earlier runs had met an outage
    for attempt in range(MAX_ATTEMPTS):
        versions = {k: env.s3().head_object(Bucket=env.stack.settings.bucket, Key=k)["ETag"] for k in keys}
        failed_id = f"cdc_loader_retry_accounts_{batch_id(keys, {k: v.strip(chr(34)) for k, v in versions.items()})}_stage_a{attempt}"
        with pytest.raises(exceptions.GoogleAPIError):
            loader.bq.load_table_from_file(
                io.BytesIO(b"not parquet"),
                f"{loader.project}.loader_retry._broken",
                job_config=broken,
                job_id=failed_id,
            ).result()
        assert loader.bq.get_job(failed_id).error_result is not None
    result = _load(loader, env, keys)
    assert result.inserted_changes == result.rows
    assert assert_changelog_has_no_duplicates(loader) == result.rows
    assert_current_state_equals_source(loader, env)
    assert _load(loader, env, keys).skipped  # and the batch, once merged, is never merged again


def test_a_file_written_again_with_other_rows_is_loaded_not_skipped(local_stack: LocalStack) -> None:
    """A capture reset or a DMS table reload writes LOAD00000001.parquet again, with the rows of a new snapshot:
    the same key, other content. It must load (a batch is its files' contents); the first version stays merged."""
    env = new_env(local_stack, "slots_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 4))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"})
    ClusterCapture(env.mapping(table), env.replication(), env.store()).snapshot([table])
    [full_load] = [k for k in landed_keys(env, "accounts") if k.rsplit("/", 1)[-1].startswith("LOAD")]
    loader = _loader(local_stack, env, f"{env.schema}_rewritten")
    first = _load(loader, env, [full_load])
    assert first.inserted_changes == first.rows == 3
    assert _load(loader, env, [full_load]).skipped
    insert_accounts(env, [4])
    ClusterCapture(env.mapping(table), env.replication(), env.store()).snapshot([table])  # same key, new rows
    rewritten = _load(loader, env, [full_load])
    assert not rewritten.skipped and rewritten.inserted_changes == rewritten.rows == 4
    assert assert_changelog_has_no_duplicates(loader) == 7
    assert_current_state_equals_source(loader, env)
