"""The re-snapshot job: a new full load of one table heals changes whose landing files are gone."""

from __future__ import annotations

import datetime as dt
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from cdc.landing import load_file_key
from cdc.mappings import Mappings, load_mappings
from cdc.settings import Settings
from cdc_assets.landed_files import read_landed
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import landed_keys_for_day
from cdc_assets.resnapshot import build_resnapshot_job, find_table
from cdc_assets.resources import BigQueryCdcResource, LandingResource, MySqlSourceResource
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
from tests.support.capture import (
    capture_changes,
    landed_keys,
    new_env,
    pipeline_resources,
    run_requested_resnapshots,
    run_sql,
)
from tests.support.commands import run_cdc
from tests.support.runs import end_once_waited_for


def test_resnapshot_restores_a_table_whose_landing_files_are_gone(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)  # the cluster's connection variables, read by the MySQL resource
    env = new_env(local_stack, "roulette_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 6))
    table = env.table(
        "accounts", ["id"], type_overrides={"vip": "BOOL"}, load_mode="batch"
    )  # <schema>.accounts
    cluster = env.mapping(table)
    capture_changes(env, cluster)
    loader = accounts_loader(local_stack, env, env.schema)
    loaded = landed_keys(env, "accounts")
    load_files(loader, env, sorted(loaded))
    assert_current_state_equals_source(loader, env)

    # changes whose files are lost before they are loaded: an insert, a delete, an update and a key change
    insert_accounts(env, [7])
    capture_changes(
        env,
        cluster,
        "DELETE FROM `{schema}`.accounts WHERE id = 2",
        "UPDATE `{schema}`.accounts SET nick = 'lost 🎲', money = 9.5 WHERE id = 1",
        "UPDATE `{schema}`.accounts SET id = 30 WHERE id = 3",
    )
    lost = sorted(landed_keys(env, "accounts") - loaded)
    assert lost
    env.s3().delete_objects(
        Bucket=local_stack.settings.bucket, Delete={"Objects": [{"Key": k} for k in lost]}
    )
    with pytest.raises(AssertionError):
        assert_current_state_equals_source(loader, env)  # BigQuery is behind and cannot catch up by itself

    resources = pipeline_resources(env)
    landing = resources["landing"]
    job = build_resnapshot_job(Mappings(Path("."), (cluster,)), Settings.load())
    instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(
        run_config={"ops": {"resnapshot_from_source": {"config": {"table": table.target}}}},
        resources=resources,
        instance=instance,
    )
    assert result.success
    logged = "\n".join(entry.user_message for entry in instance.all_logs(result.run_id))
    assert re.search(rf"full load of {table.source} \(rows\): 5 (of ~\d+ \(\d+ %\).*ETA|done)", logged), (
        logged
    )
    [materialization] = result.asset_materializations_for_node("resnapshot_from_source")
    assert materialization.asset_key == bigquery_asset_key(table)
    assert materialization.partition == dt.datetime.now(dt.UTC).date().isoformat()
    assert materialization.metadata["rows"].value == 5  # 1, 4, 5, 7, 30
    assert_current_state_equals_source(loader, env)  # the delete, the update and the key move are there
    assert_changelog_has_no_duplicates(loader)
    snapshot_files = sorted(landed_keys(env, "accounts") - loaded)
    assert snapshot_files == [load_file_key(env.prefix, env.schema, "accounts", 2)]  # beside LOAD1

    # the pipeline goes on from the snapshot: new changes load, and a late file from before the snapshot (the
    # first full load, which still holds id 2 and the old id 3) cannot bring a deleted row back
    capture_changes(
        env,
        cluster,
        "UPDATE `{schema}`.accounts SET n = 77 WHERE id = 1",
        "DELETE FROM `{schema}`.accounts WHERE id = 30",
    )
    newer = sorted(landed_keys(env, "accounts") - loaded - set(snapshot_files))
    assert newer
    first_load = load_file_key(env.prefix, env.schema, "accounts", 1)
    load_files(loader, env, [first_load, *newer])
    assert_current_state_equals_source(loader, env)

    # a backfill of the day (a rebuild from every file landed today) keeps the snapshot's horizon
    today = dt.datetime.now(dt.UTC).date()
    keys = landed_keys_for_day(landing, table, today)
    assert first_load in keys and snapshot_files[0] in keys
    data = read_landed(env.s3(), local_stack.settings.bucket, keys)
    assert data is not None
    loader.load(data, keys, rebuild_id="backfill-after-resnapshot")
    assert_current_state_equals_source(loader, env)
    assert_changelog_has_no_duplicates(loader)


def test_resnapshot_in_streaming_mode_sets_the_current_state_from_the_snapshot(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming mode: the snapshot's rows UPSERTed and the keys it lacks DELETEd at its horizon - through the Write
    API (a CDC table takes no DML) - so a late file from before it cannot bring a deleted row back."""
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)
    env = new_env(local_stack, "roulette_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 6))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}, load_mode="streaming")
    cluster = env.mapping(table)
    capture_changes(env, cluster)
    loader = accounts_stream_loader(local_stack, env, env.schema)
    stream_all(loader, env)
    loaded = landed_keys(env, "accounts")
    insert_accounts(env, [7])
    capture_changes(
        env,
        cluster,
        "DELETE FROM `{schema}`.accounts WHERE id = 2",
        "UPDATE `{schema}`.accounts SET nick = 'lost 🎲', money = 9.5 WHERE id = 1",
        "UPDATE `{schema}`.accounts SET id = 30 WHERE id = 3",
    )
    s3, bucket = env.s3(), local_stack.settings.bucket
    lost = {
        k: s3.get_object(Bucket=bucket, Key=k)["Body"].read()
        for k in sorted(landed_keys(env, "accounts") - loaded)
    }
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in lost]})

    job = build_resnapshot_job(Mappings(Path("."), (cluster,)), Settings.load())
    with dg.instance_for_test() as instance:
        # a load run of the table is in progress (it may read the snapshot's files too): the job writes after it
        load_run = dg.DagsterRun(
            job_name="__ASSET_JOB",
            run_id=str(uuid.uuid4()),
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset({bigquery_asset_key(table)}),
        )
        instance.add_run(load_run)
        ended = threading.Thread(target=end_once_waited_for, args=(instance, load_run), daemon=True)
        ended.start()
        try:
            result = job.execute_in_process(
                run_config={"ops": {"resnapshot_from_source": {"config": {"table": table.target}}}},
                resources=pipeline_resources(env),
                instance=instance,
            )
        finally:
            ended.join()
        logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert result.success
    waits = [i for i, m in enumerate(logged) if f"waiting for run(s) {load_run.run_id}" in m]
    writes = [i for i, m in enumerate(logged) if "current state re-derived from the snapshot" in m]
    assert waits and writes and waits[0] < writes[0], logged  # it waited for the load run, then wrote
    [materialization] = result.asset_materializations_for_node("resnapshot_from_source")
    assert (
        materialization.metadata["load_mode"].value == "streaming"
        and materialization.metadata["rows"].value == 5
    )
    assert_current_state_equals_source(
        loader, env
    )  # id 2 deleted, 1 updated, 3 moved to 30: from the snapshot
    total = assert_changelog_has_no_duplicates(loader)

    # the snapshot's files are full-load files with a new ETag: a load run may read them too, before or after the
    # job (the sensor sees their S3 events) - the snapshot's changes are in the changelog once either way
    horizon = str(materialization.metadata["snapshot_horizon"].value)
    snapshot_keys = sorted(k for k in landed_keys(env, "accounts") - loaded if "/LOAD" in k)
    assert snapshot_keys
    again = accounts_stream_loader(local_stack, env, env.schema).snapshot(s3, bucket, snapshot_keys, horizon)
    assert again.inserted_changes == 0 and assert_changelog_has_no_duplicates(loader) == total
    # another snapshot at the same position under other names (the capture's full load after a reset): its changes
    # are the same changes
    renamed = [
        re.sub(r"LOAD([0-9A-F]{8})", lambda m: f"LOAD{int(m[1], 16) + 0x100:08X}", k) for k in snapshot_keys
    ]
    for source, copy in zip(snapshot_keys, renamed, strict=True):
        s3.copy_object(Bucket=bucket, Key=copy, CopySource={"Bucket": bucket, "Key": source})
    twin = accounts_stream_loader(local_stack, env, env.schema).snapshot(s3, bucket, renamed, horizon)
    assert twin.inserted_changes == 0 and assert_changelog_has_no_duplicates(loader) == total
    assert_current_state_equals_source(loader, env)

    # new changes stream on; the lost files come back late (named by their messages): they change nothing now
    capture_changes(env, cluster, "UPDATE `{schema}`.accounts SET n = 77 WHERE id = 1")
    for key, body in lost.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    stream_all(accounts_stream_loader(local_stack, env, env.schema), env, named=sorted(lost))
    assert_current_state_equals_source(loader, env)
    assert_changelog_has_no_duplicates(loader)

    # a backfill of the day sends every change again: the snapshot's horizon holds
    keys = landed_keys_for_day(pipeline_resources(env)["landing"], table, dt.datetime.now(dt.UTC).date())
    accounts_stream_loader(local_stack, env, env.schema).rebuild(s3, bucket, keys)
    assert_current_state_equals_source(loader, env)
    assert_changelog_has_no_duplicates(loader)


def test_resnapshot_names_an_unknown_table_and_refuses_append_only_tables() -> None:
    mappings = load_mappings()
    with pytest.raises(dg.Failure, match=r"no mapped table is named 'slots\.nope'"):
        find_table(mappings, "slots.nope")
    cluster, table = find_table(mappings, "slots.bets")
    assert find_table(mappings, table.source) == (cluster, table)
    append_only = next(t for _, t in mappings.tables() if not t.primary_key)
    job = build_resnapshot_job(mappings, Settings.load())
    result = job.execute_in_process(
        run_config={"ops": {"resnapshot_from_source": {"config": {"table": append_only.target}}}},
        resources={
            "landing": LandingResource(bucket="unused"),
            "bigquery": BigQueryCdcResource(project="unused"),
            "mysql": MySqlSourceResource(),
        },
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("resnapshot_from_source")
    assert failure is not None and "append-only" in str(failure.user_failure_data.description)


def test_cdc_resnapshot_names_an_unknown_table(tmp_path: Path) -> None:
    result = run_cdc("resnapshot", "slots.nope", env={"CDC_STATE_DIR": str(tmp_path)}, check=False)
    assert result.returncode == 1
    assert "re-snapshot of slots.nope failed: " in result.stderr
    assert "no mapped table is named 'slots.nope'" in result.stderr


@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_a_column_added_with_a_default_reaches_every_existing_row(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """`ALTER TABLE ... ADD COLUMN c ... DEFAULT 'x'` gives every existing row the value at the source without row
    events: the capture asks for a re-snapshot, the `resnapshot_requests` sensor runs it (once per request), and
    every row then holds the default in BigQuery, beside the rows changed after the ALTER."""
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)
    env = new_env(local_stack, "roulette_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 5))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}, load_mode=mode)
    cluster = env.mapping(table)
    loader: Any = (
        accounts_loader(local_stack, env, env.schema)
        if mode == "batch"
        else accounts_stream_loader(local_stack, env, env.schema)
    )

    def load() -> None:
        if mode == "batch":
            load_files(loader, env, sorted(landed_keys(env, "accounts")))
        else:
            stream_all(loader, env)

    capture_changes(
        env,
        cluster,
        "ALTER TABLE `{schema}`.accounts ADD COLUMN c VARCHAR(4) NOT NULL DEFAULT 'x', ADD COLUMN d INT NULL",
        "UPDATE `{schema}`.accounts SET c = 'y' WHERE id = 2",  # changed after the ALTER: carries its value
    )
    load()
    with pytest.raises(AssertionError, match="column c"):
        assert_current_state_equals_source(loader, env)  # rows 1, 3, 4 hold NULL, not 'x'

    resources = pipeline_resources(env)
    instance = dg.DagsterInstance.ephemeral()
    requests = run_requested_resnapshots(cluster, resources, instance)
    assert len(requests) == 1 and requests[0].run_key and requests[0].run_key.startswith(f"{table.source}@")
    assert_current_state_equals_source(loader, env)  # c = 'x' in every existing row, 'y' in row 2
    capture_changes(env, cluster, "UPDATE `{schema}`.accounts SET c = 'z' WHERE id = 3")
    load()
    assert_current_state_equals_source(loader, env)
    assert_changelog_has_no_duplicates(loader)


def test_a_table_dropped_and_recreated_or_swapped_in_by_rename_ends_equal_to_the_source(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapped table dropped and re-created mid-stream: its old rows leave BigQuery (the DROP lands as a TRUNCATE
    change), the new ones arrive. An online schema change's cut-over (`RENAME TABLE t TO t_old, t_new TO t`, rows
    copied into t_new without events the capture reads): the rename lands as a TRUNCATE and a re-snapshot request,
    whose run brings BigQuery equal to the source."""
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)
    env = new_env(local_stack, "roulette_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 5))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}, load_mode="streaming")
    cluster = env.mapping(table)
    loader = accounts_stream_loader(local_stack, env, env.schema)
    capture_changes(
        env,
        cluster,
        "DROP TABLE `{schema}`.accounts",
        DDL,
        "INSERT INTO `{schema}`.accounts (id, n) VALUES (20, 1), (21, 2)",
    )
    stream_all(loader, env)
    assert_current_state_equals_source(loader, env)  # 20 and 21 only

    capture_changes(
        env,
        cluster,
        DDL.replace(".accounts", ".accounts_new"),
        "INSERT INTO `{schema}`.accounts_new SELECT * FROM `{schema}`.accounts",
        "INSERT INTO `{schema}`.accounts_new (id, n) VALUES (22, 3)",
        "RENAME TABLE `{schema}`.accounts TO `{schema}`.accounts_old, `{schema}`.accounts_new TO `{schema}`.accounts",
    )
    stream_all(loader, env)
    resources = pipeline_resources(env)
    instance = dg.DagsterInstance.ephemeral()
    assert len(run_requested_resnapshots(cluster, resources, instance)) == 1
    assert_current_state_equals_source(loader, env)  # 20, 21, 22
    assert_changelog_has_no_duplicates(loader)
