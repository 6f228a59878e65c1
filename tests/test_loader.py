"""The loader against the BigQuery API server: changelog exactly once, current state equal to the source."""

from __future__ import annotations

import io
from typing import Any

import pyarrow.parquet as pq
import pytest
from google.api_core import exceptions
from google.cloud import bigquery

from capture.full_load import full_load
from capture.service import ClusterCapture
from cdc.landing import table_prefix
from cdc_assets.batch_loader import MAX_ATTEMPTS
from cdc_assets.landed_files import batch_id
from local_stack.stack import LocalStack
from tests.support.accounts import (
    DDL,
    accounts_loader,
    accounts_stream_loader,
    assert_changelog_has_no_duplicates,
    assert_current_state_equals_source,
    insert_accounts,
    load_files,
    stream_all,
)
from tests.support.capture import FAST, CaptureEnv, landed_keys, new_env, run_sql, running, wait_caught_up


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
    prefix = table_prefix(env.prefix, env.schema, "accounts")
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=local_stack.settings.bucket, Prefix=prefix)["Contents"]
    )
    assert len(keys) >= 3
    return env, keys


def test_overlapping_and_repeated_batches_load_each_change_once(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = accounts_loader(local_stack, env, "loader_overlap")
    half = keys[: len(keys) // 2]
    first = load_files(loader, env, half)
    assert first.inserted_changes == first.rows
    everything = load_files(loader, env, keys)  # redelivery of the first half together with the rest
    assert everything.inserted_changes == everything.rows - first.rows
    again = load_files(loader, env, keys)  # the same batch once more: its jobs already ran
    assert again.inserted_changes == 0
    total = assert_changelog_has_no_duplicates(loader)
    assert total == everything.rows
    assert_current_state_equals_source(loader, env)


def test_out_of_order_files_never_regress_the_current_state(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = accounts_loader(local_stack, env, "loader_out_of_order")
    for key in reversed(keys):  # newest file first, the full load last
        load_files(loader, env, [key])
    assert_changelog_has_no_duplicates(loader)
    assert_current_state_equals_source(loader, env)


def test_a_failed_first_job_is_retried_under_a_new_id(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = accounts_loader(local_stack, env, "loader_retry")
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
    result = load_files(loader, env, keys)
    assert result.inserted_changes == result.rows
    assert assert_changelog_has_no_duplicates(loader) == result.rows
    assert_current_state_equals_source(loader, env)
    assert load_files(loader, env, keys).skipped  # and the batch, once merged, is never merged again


def test_a_file_written_again_with_other_rows_is_loaded_not_skipped(local_stack: LocalStack) -> None:
    """A capture reset or a DMS table reload writes LOAD00000001.parquet again, with the rows of a new snapshot:
    the same key, other content. It must load (a batch is its files' contents); the first version stays merged."""
    env = new_env(local_stack, "slots_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 4))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"})
    full_load(env.cluster_name, env.replication(), env.store(), [table])
    [first_load] = [k for k in landed_keys(env, "accounts") if k.rsplit("/", 1)[-1].startswith("LOAD")]
    loader = accounts_loader(local_stack, env, f"{env.schema}_rewritten")
    first = load_files(loader, env, [first_load])
    assert first.inserted_changes == first.rows == 3
    assert load_files(loader, env, [first_load]).skipped
    insert_accounts(env, [4])
    full_load(env.cluster_name, env.replication(), env.store(), [table])  # same key, new rows
    rewritten = load_files(loader, env, [first_load])
    assert not rewritten.skipped and rewritten.inserted_changes == rewritten.rows == 4
    assert assert_changelog_has_no_duplicates(loader) == 7
    assert_current_state_equals_source(loader, env)


@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_a_truncate_at_the_source_empties_bigquery_exactly(local_stack: LocalStack, mode: str) -> None:
    """`TRUNCATE TABLE` writes no row events: the capture lands it as one change (Op T, every column NULL) at the
    statement's position. The current state drops every row changed before it and keeps those written after it in
    the same batch; the changelog records it once; a batch loaded again changes nothing; later changes apply."""
    env = new_env(local_stack, "slots_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 6))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"})
    capture = ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)
    with running(capture):
        wait_caught_up(env)
        run_sql(
            env, "UPDATE `{schema}`.accounts SET n = 1 WHERE id = 2", "TRUNCATE TABLE `{schema}`.accounts"
        )
        insert_accounts(env, [7, 8])
        run_sql(env, "UPDATE `{schema}`.accounts SET n = 2 WHERE id = 7")
        wait_caught_up(env)
    landed = [
        pq.read_table(io.BytesIO(env.s3().get_object(Bucket=env.stack.settings.bucket, Key=k)["Body"].read()))
        for k in sorted(landed_keys(env, "accounts"))
    ]
    truncates = [row for part in landed for row in part.to_pylist() if row["Op"] == "T"]
    assert len(truncates) == 1 and all(
        v is None for k, v in truncates[0].items() if k in ("id", "nick", "money")
    )

    dataset = f"{env.schema}_truncate_{mode}"
    loader: Any
    if mode == "batch":
        loader = accounts_loader(local_stack, env, dataset)

        def load() -> int:
            return int(load_files(loader, env, sorted(landed_keys(env, "accounts"))).inserted_changes)
    else:
        loader = accounts_stream_loader(local_stack, env, dataset)

        def load() -> int:
            return int(stream_all(loader, env).inserted_changes)

    load()
    assert_current_state_equals_source(loader, env)  # ids 7 and 8 only
    marked = f"SELECT COUNT(*) AS n FROM {loader.ref('accounts_changelog')} WHERE `_op` = 'T'"
    assert next(iter(loader.bq.query(marked).result())).n == 1
    assert load() == 0  # nothing twice
    assert_current_state_equals_source(loader, env)
    with running(ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)):
        insert_accounts(env, [9])
        run_sql(env, "UPDATE `{schema}`.accounts SET n = 3 WHERE id = 8")
        wait_caught_up(env)
    assert load() >= 2
    assert_current_state_equals_source(loader, env)  # 7, 8 (changed), 9
    assert_changelog_has_no_duplicates(loader)
