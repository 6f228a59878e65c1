"""Streaming mode against the BigQuery API server: the changelog exactly once through the Storage Write API (a
committed stream, offsets, the high-water mark), the current state by native CDC equal to the source value for
value - also after a lost state, a crash between append and state, a late file and a redelivery."""

from __future__ import annotations

from typing import Any

import pytest
from google.api_core import exceptions

from capture.service import ClusterCapture
from cdc.clients import bigquery_client, bigquery_write_client
from cdc.landing import ControlDocuments, table_prefix
from cdc_assets.batch_loader import MergeLoader
from cdc_assets.landed_files import read_landed
from cdc_assets.stream_loader import STATE_ROOT, StreamLoader
from cdc_testing import oracle
from local_stack.stack import LocalStack
from tests.support.accounts import (
    DDL,
    accounts_stream_loader,
    assert_changelog_has_no_duplicates,
    assert_current_state_equals_source,
    insert_accounts,
    stream_all,
)
from tests.support.capture import (
    FAST,
    CaptureEnv,
    landed_keys,
    new_env,
    run_sql,
    running,
    source_text_rows,
    wait_caught_up,
)
from tests.support.every_type import capture_every_type


def record_calls(client: Any, method: str) -> list[str]:
    """The first argument of every call of the client's `method` from now on (the call itself goes through)."""
    calls: list[str] = []
    original = getattr(client, method)

    def recording(first: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(first))
        return original(first, *args, **kwargs)

    setattr(client, method, recording)
    return calls


@pytest.fixture(scope="module")
def landed(local_stack: LocalStack) -> tuple[CaptureEnv, list[str]]:
    """Captured changes of one table: a full load, then inserts, updates, a key change and deletes, in many files."""
    env = new_env(local_stack, "poker_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 6))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"})
    with running(ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)):
        wait_caught_up(env)
        for first in range(6, 11):
            insert_accounts(env, [first])
            wait_caught_up(env)
        run_sql(
            env,
            "UPDATE `{schema}`.accounts SET money = money * 2, nick = 'renamed 🎉' WHERE id IN (2, 7)",
            "UPDATE `{schema}`.accounts SET id = 100 WHERE id = 3",  # a key change
        )
        wait_caught_up(env)
        run_sql(
            env,
            "DELETE FROM `{schema}`.accounts WHERE id IN (4, 8)",
            "UPDATE `{schema}`.accounts SET opts = '', t = '838:59:59' WHERE id = 1",
        )
        wait_caught_up(env)
    s3 = env.s3()
    prefix = table_prefix(env.prefix, env.schema, "accounts")
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=local_stack.settings.bucket, Prefix=prefix)["Contents"]
    )
    assert len(keys) >= 6
    return env, keys


def test_every_change_once_and_the_current_state_equal_to_the_source(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = accounts_stream_loader(local_stack, env, "stream_once")
    first = stream_all(loader, env)
    assert first.files == len(keys) and first.inserted_changes == first.rows
    assert first.write_calls >= 3  # current state, changelog, ledger; no load job
    assert_current_state_equals_source(loader, env)
    assert assert_changelog_has_no_duplicates(loader) == first.rows
    redelivery = accounts_stream_loader(local_stack, env, "stream_once")
    queries = record_calls(redelivery.bq, "query")
    again = stream_all(redelivery, env, named=keys)  # redelivered
    assert again.files == 0 and again.inserted_changes == 0
    assert queries == []  # files the state remembers as read: the ledger is not asked
    assert loader.loaded_files(keys) == set(keys)  # the ledger names every file


def test_a_lost_state_is_rebuilt_from_bigquery(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = accounts_stream_loader(local_stack, env, "stream_lost_state")
    total = stream_all(loader, env).rows
    loader.control.delete("state", loader.state_name)
    again = stream_all(accounts_stream_loader(local_stack, env, "stream_lost_state"), env)
    assert (
        again.resynced and again.inserted_changes == 0 and again.files == len(keys)
    )  # all read again, none added
    assert assert_changelog_has_no_duplicates(loader) == total
    assert_current_state_equals_source(loader, env)


def test_an_append_retried_with_its_requests_used_up_fails_the_load_instead_of_losing_rows(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    """Google's client retries an AppendRows connection that met UNAVAILABLE with the same request iterator, which
    the failed attempt may have used up: the retry sends nothing (or only the rest) and ends without an error. The
    current state's append is made to go that way here: the load fails, saying so, and the next load loses
    nothing and doubles nothing."""
    env, _ = landed
    loader = accounts_stream_loader(local_stack, env, "stream_used_up")
    real = loader.write.append_rows

    def retried_with_requests_used_up(requests: Any, *args: Any, **kwargs: Any) -> Any:
        first = next(requests)  # the failed attempt's
        if first.write_stream.endswith("/tables/accounts/streams/_default"):
            return real(requests, *args, **kwargs)  # what is left: nothing
        return real(iter([first, *requests]), *args, **kwargs)

    loader.write.append_rows = retried_with_requests_used_up
    with pytest.raises(exceptions.ServiceUnavailable, match="answered 0 of 1 request"):
        stream_all(loader, env)
    again = stream_all(accounts_stream_loader(local_stack, env, "stream_used_up"), env)
    assert again.inserted_changes == again.rows
    assert assert_changelog_has_no_duplicates(loader) == again.rows
    assert_current_state_equals_source(loader, env)


def test_a_crash_between_append_and_state_adds_nothing_twice(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    loader = accounts_stream_loader(local_stack, env, "stream_crash")
    first = stream_all(loader, env, named=keys[:1])  # the full load only? no: everything new, in one go
    assert first.inserted_changes == first.rows
    # the same files again, from a state that lags (as after a crash just before the state was written)
    state = loader.read_state()
    assert state is not None
    lagging = type(state)(
        stream=state.stream, columns=state.columns
    )  # offset 0, no high-water mark, no cursor
    loader.write_state(lagging)
    again = stream_all(accounts_stream_loader(local_stack, env, "stream_crash"), env)
    assert (
        again.resynced and again.inserted_changes == 0
    )  # ALREADY_EXISTS at offset 0: rebuilt, nothing added
    assert assert_changelog_has_no_duplicates(loader) == first.rows
    assert_current_state_equals_source(loader, env)


def test_a_late_file_is_loaded_and_its_present_changes_skipped(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    s3, bucket = env.s3(), local_stack.settings.bucket
    cdc_keys = [k for k in keys if "/LOAD" not in k]
    late = cdc_keys[len(cdc_keys) // 2]  # a middle file: absent while the files after it load
    body = s3.get_object(Bucket=bucket, Key=late)["Body"].read()
    s3.delete_object(Bucket=bucket, Key=late)
    try:
        loader = accounts_stream_loader(local_stack, env, "stream_late")
        stream_all(loader, env)
    finally:
        s3.put_object(Bucket=bucket, Key=late, Body=body)
    caught_up = stream_all(accounts_stream_loader(local_stack, env, "stream_late"), env, named=[late])
    assert caught_up.files == 1 and caught_up.inserted_changes >= 1  # its changes were missing: appended
    assert_current_state_equals_source(loader, env)
    total = assert_changelog_has_no_duplicates(loader)
    redelivered = stream_all(accounts_stream_loader(local_stack, env, "stream_late"), env, named=keys)
    assert redelivered.inserted_changes == 0 and assert_changelog_has_no_duplicates(loader) == total


def test_a_load_takes_the_tables_schemas_from_the_state_and_recreates_tables_dropped_since(
    local_stack: LocalStack, landed: tuple[CaptureEnv, list[str]]
) -> None:
    env, keys = landed
    s3, bucket = env.s3(), local_stack.settings.bucket
    first = accounts_stream_loader(local_stack, env, "stream_schemas")
    total = stream_all(first, env).rows
    state = first.read_state()
    assert state is not None and set(state.schemas) == {
        "accounts",
        "accounts_changelog",
        "accounts_loaded_files",
    }
    # the same columns again (a backfill of the day): BigQuery is not asked for the tables
    again = accounts_stream_loader(local_stack, env, "stream_schemas")
    asked = record_calls(again.bq, "get_table")
    assert again.rebuild(s3, bucket, keys).inserted_changes == 0
    assert asked == []
    # the tables dropped since (the type-change remedy's first step): the next load makes them again and loads
    for name in ("accounts", "accounts_changelog"):
        again.bq.delete_table(again.table_id(name))
    rebuilt = accounts_stream_loader(local_stack, env, "stream_schemas").rebuild(s3, bucket, keys)
    assert rebuilt.inserted_changes == total
    assert assert_changelog_has_no_duplicates(first) == total
    assert_current_state_equals_source(first, env)


@pytest.mark.parametrize("mode", ["streaming", "batch"])
def test_every_type_reaches_bigquery_equal_to_the_source(local_stack: LocalStack, mode: str) -> None:
    """Every type and edge value, in both load modes - DECIMAL(38,10) as BIGNUMERIC, DECIMAL(65,10) as exact text."""
    env = new_env(local_stack, "slots_accounts")
    table = capture_every_type(env)
    mapping = table.model_copy(update={"target": f"{env.schema}_{mode}.every_type"})
    bq = bigquery_client(local_stack.settings.bigquery_project, endpoint=local_stack.bigquery.endpoint)
    loader: Any
    if mode == "streaming":
        control = ControlDocuments(env.s3(), local_stack.settings.bucket, env.prefix, root=STATE_ROOT)
        loader = StreamLoader(
            bq, bigquery_write_client(local_stack.bigquery.write_endpoint), mapping, control
        )
        stream_all(loader, env)
    else:
        loader = MergeLoader(bq, mapping)
        keys = sorted(landed_keys(env, "every_type"))
        data = read_landed(env.s3(), local_stack.settings.bucket, keys)
        assert data is not None
        loader.load(data, keys)
    types_in_bigquery = {f.name: f.field_type for f in bq.get_table(loader.table_id("every_type")).schema}
    assert types_in_bigquery["big"] == "BIGNUMERIC"  # DECIMAL(38,10)
    assert types_in_bigquery["wide"] == "STRING"  # DECIMAL(65,10): 55 integer digits, beyond BIGNUMERIC's 38
    expected, types = source_text_rows(env, "every_type", ["id"])
    rows = bq.query(f"SELECT * FROM {loader.ref('every_type')}").result()
    actual = oracle.rendered_rows(rows, types, ["id"])
    assert set(actual) == set(expected) == {("1",), ("3",), ("101",), ("103",), ("1000",)}
    differences = oracle.differences(expected, actual)
    assert differences["different_rows"] == 0, differences["first_differences"]
