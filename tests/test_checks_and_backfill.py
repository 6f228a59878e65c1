"""Asset checks (row counts at one snapshot, landed vs loaded files), partition backfills that rebuild a day, and
the alerts they raise - against the real servers."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import dagster as dg
import pytest
from google.cloud import bigquery

from capture.service import ClusterCapture
from cdc.clients import bigquery_client
from cdc.mappings import quote_bigquery
from cdc.settings import Settings
from cdc.source import begin_consistent_snapshot
from cdc_assets.checks import FILES_LOADED, ROW_COUNT, SourceSnapshot, build_table_checks
from cdc_assets.content_check import CONTENT, compare_content
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import LOADER, NO_DUPLICATES, load_run_config
from cdc_assets.resources import LandingResource
from cdc_assets.tables import build_table_assets
from cdc_assets.targets import TableTargets
from local_stack.stack import LocalStack
from sensors.alerts import AlertWebhookResource, alert_failed_checks, build_dead_letter_alert_sensor
from tests.support.accounts import (
    DDL,
    accounts_loader,
    accounts_stream_loader,
    assert_changelog_has_no_duplicates,
    assert_current_state_equals_source,
    insert_accounts,
)
from tests.support.capture import (
    FAST,
    capture_changes,
    landed_keys,
    landing_resource,
    new_env,
    pipeline_resources,
    run_requested_resnapshots,
    run_sql,
    running,
    wait_caught_up,
)
from tests.support.webhook import Receiver


def _tables(loader: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the changelog and the current state, in a stable order."""
    out = {}
    for name in ("accounts", "accounts_changelog"):
        rows = loader.bq.query(f"SELECT * FROM {loader.ref(name)}").result()
        out[name] = sorted(tuple(str(v) for v in row.values()) for row in rows)
    return out


def test_row_count_check_backfill_and_alerts(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)  # AWS endpoint and the clusters' connection variables
    env = new_env(local_stack, "poker_accounts")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 7))
    run_sql(
        env, "UPDATE `{schema}`.accounts SET at = UTC_TIMESTAMP(6) WHERE id <= 4"
    )  # today, per-day counts
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}, partition_column="at").model_copy(
        update={"target": f"{env.schema}.accounts", "load_mode": "batch"}  # rows deleted behind its back: DML
    )
    cluster = env.mapping(table)
    capture_changes(
        env,
        cluster,
        "DELETE FROM `{schema}`.accounts WHERE id = 6",
        "UPDATE `{schema}`.accounts SET id = 60 WHERE id = 5",
    )

    landing = landing_resource(
        local_stack,
        env.prefix,
        queue_url=local_stack.environment()["CDC_SQS_QUEUE_URL"],
        dead_letter_queue_url=local_stack.environment()["CDC_SQS_DLQ_URL"],
    )
    resources = {**pipeline_resources(env), "landing": landing}
    asset = build_table_assets([(cluster, table)], Settings.load())
    checks = build_table_checks(cluster, table, Settings.load())
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(dt.UTC).date().isoformat()

    def backfill() -> dict[str, Any]:
        result = dg.materialize([asset], partition_key=today, resources=resources, instance=instance)
        assert result.success
        return {k: v.value for k, v in result.asset_materializations_for_node(LOADER)[0].metadata.items()}

    def check() -> dict[str, dg.AssetCheckEvaluation]:
        result = dg.materialize(
            [asset, checks],
            selection=dg.AssetSelection.checks(checks),
            resources=resources,
            instance=instance,
        )
        return {e.check_name: e for e in result.get_asset_check_evaluations()}

    loaded = backfill()
    assert loaded["rebuild"] is True and loaded["files"] >= 2 and loaded["load_jobs"] == 1
    assert loaded["load_jobs_today"] >= 1 and loaded["projected_load_jobs_today"] >= loaded["load_jobs_today"]
    loader = accounts_loader(local_stack, env, env.schema)
    assert_current_state_equals_source(loader, env)

    results = check()
    counted = results[ROW_COUNT]
    assert counted.passed and counted.metadata["exact"].value is True, counted.metadata
    assert counted.metadata["source_rows"].value == 5 == counted.metadata["bigquery_rows_at_snapshot"].value
    per_day = counted.metadata["per_day"].value
    yesterday = (dt.date.fromisoformat(today) - dt.timedelta(days=1)).isoformat()
    assert set(per_day) == {yesterday, today} and per_day[today]["source"] >= 4
    assert all(day["source"] == day["bigquery"] for day in per_day.values())
    assert results[FILES_LOADED].passed and results[FILES_LOADED].metadata["overdue_files"].value == 0
    content = results[CONTENT]  # every type of the accounts table, value for value, on the check days
    assert content.passed and content.metadata["exact"].value is True, content.metadata
    assert (
        content.metadata["source_rows_compared"].value
        == 4
        == content.metadata["bigquery_rows_compared"].value
    )
    assert content.metadata["columns_compared"].value == 14 and content.metadata["chunks"].value == 1  # today

    # a steady load: changes captured but not loaded yet are no false alarm - the check says it is not exact
    with running(ClusterCapture(cluster, env.replication(), env.store(), FAST)):
        insert_accounts(env, [7])
        run_sql(env, "DELETE FROM `{schema}`.accounts WHERE id = 1")
        wait_caught_up(env)
    catching_up = check()
    assert catching_up[ROW_COUNT].passed and catching_up[ROW_COUNT].metadata["exact"].value is False
    assert "landed, not loaded yet" in json.dumps(catching_up[ROW_COUNT].metadata["waiting_for"].value)
    assert catching_up[CONTENT].passed and catching_up[CONTENT].metadata["exact"].value is False
    # nothing is asked of BigQuery while the answer would not count
    assert "bigquery_rows" not in catching_up[ROW_COUNT].metadata
    assert "bigquery_rows_compared" not in catching_up[CONTENT].metadata
    assert backfill()["new_changes"] == 2
    caught_up = check()
    assert caught_up[ROW_COUNT].metadata["exact"].value is True
    assert caught_up[CONTENT].passed and caught_up[CONTENT].metadata["exact"].value is True

    # a row deleted behind the pipeline's back: the check fails, naming both counts
    loader.bq.query(f"DELETE FROM {loader.ref('accounts')} WHERE id = 2").result()
    broken = check()[ROW_COUNT]
    assert not broken.passed and broken.metadata["exact"].value is True
    assert (
        broken.metadata["source_rows"].value == 5 and broken.metadata["bigquery_rows_at_snapshot"].value == 4
    )
    assert "MISMATCH" in (broken.description or "")
    missing = check()[CONTENT]  # ... and so does the content check, naming the key
    assert not missing.passed and missing.metadata["first_differences"].value == ["id=2: only at the source"]

    # ... the alert sensor posts it to the webhook with the numbers
    alerts = {"alerts": AlertWebhookResource(url=receiver.url)}
    alert_failed_checks(dg.build_sensor_context(instance=instance, resources=alerts))
    assert ROW_COUNT in receiver.texts() and "source_rows=5" in receiver.texts()
    assert "bigquery_rows_at_snapshot=4" in receiver.texts()

    # ... and a backfill of the day puts it back; a second backfill changes nothing at all
    backfill()
    assert check()[ROW_COUNT].passed
    assert_current_state_equals_source(loader, env)
    before = _tables(loader)
    assert backfill()["new_changes"] == 0
    assert _tables(loader) == before
    assert_changelog_has_no_duplicates(loader)

    # a file that is not Parquet: dead-lettered with its name and the reason, the rest loads, the webhook hears it
    s3 = landing.s3()
    while _pop(landing):
        pass  # an empty dead-letter queue for this test
    poison = f"{env.prefix}/{env.schema}/accounts/{today.replace('-', '/')}/20261125-000000000000001.parquet"
    s3.put_object(Bucket=landing.bucket, Key=poison, Body=b"PAR1 but not really")
    assert backfill()["dead_lettered_files"] == 1
    dead_letters = build_dead_letter_alert_sensor()
    dead_letters(dg.build_sensor_context(instance=instance, resources={"landing": landing, **alerts}))
    assert poison in receiver.texts() and "not a readable Parquet file" in receiver.texts()
    assert_current_state_equals_source(loader, env)


def _pop(landing: LandingResource) -> dict[str, Any] | None:
    sqs = landing.sqs()
    messages = sqs.receive_message(QueueUrl=landing.dead_letter_queue_url, MaxNumberOfMessages=10).get(
        "Messages"
    )
    for message in messages or []:
        sqs.delete_message(QueueUrl=landing.dead_letter_queue_url, ReceiptHandle=message["ReceiptHandle"])
    return messages[0] if messages else None


def test_a_table_missing_at_the_source_fails_its_row_count_check_naming_it(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)
    env = new_env(local_stack, "poker_accounts")
    table = env.table("not_created_yet", ["id"])
    cluster = env.mapping(table)
    checks = build_table_checks(cluster, table, Settings.load())
    resources = pipeline_resources(env)
    result = dg.materialize(
        [build_table_assets([(cluster, table)], Settings.load()), checks],
        selection=dg.AssetSelection.checks(dg.AssetCheckKey(bigquery_asset_key(table), ROW_COUNT)),
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
    )
    [evaluation] = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert evaluation.description == (
        f"{env.schema}.not_created_yet does not exist at the source (cluster poker_accounts): create it there, or "
        "remove it from (or disable it in) the cluster's mapping file and deploy the mappings"
    )


def test_streaming_checks_count_rows_exactly_and_find_duplicates(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)
    env = new_env(local_stack, "poker_accounts")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 7))
    table = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}).model_copy(
        update={"target": f"{env.schema}.accounts", "load_mode": "streaming"}
    )
    cluster = env.mapping(table)
    capture_changes(env, cluster, "UPDATE `{schema}`.accounts SET id = 60 WHERE id = 5")
    resources = pipeline_resources(env)
    asset = build_table_assets([(cluster, table)], Settings.load())
    checks = build_table_checks(cluster, table, Settings.load())
    assert {spec.name for spec in checks.check_specs} == {ROW_COUNT, FILES_LOADED, CONTENT, NO_DUPLICATES}
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(dt.UTC).date().isoformat()

    def load() -> None:
        named = {table.target: (sorted(landed_keys(env, "accounts")), [])}
        assert dg.materialize(
            [asset],
            partition_key=today,
            resources=resources,
            instance=instance,
            run_config=load_run_config(named),
        ).success

    def check() -> dict[str, dg.AssetCheckEvaluation]:
        result = dg.materialize(
            [asset, checks],
            selection=dg.AssetSelection.checks(checks),
            resources=resources,
            instance=instance,
        )
        return {e.check_name: e for e in result.get_asset_check_evaluations()}

    load()
    results = check()
    assert results[ROW_COUNT].passed and results[ROW_COUNT].metadata["exact"].value is True
    assert results[ROW_COUNT].metadata["source_rows"].value == 6
    assert results[NO_DUPLICATES].passed and results[NO_DUPLICATES].metadata["changes"].value >= 8
    assert results[FILES_LOADED].passed
    content = results[CONTENT]  # every type, read back from the CDC table's merged state
    assert content.passed and content.metadata["exact"].value is True, content.metadata
    assert content.metadata["source_rows_compared"].value == 6 and content.metadata["chunks"].value == 1

    # a source snapshot taken now, compared after later changes are loaded: BigQuery is rolled back to it exactly
    with env.admin() as before, before.cursor() as cursor:
        position = begin_consistent_snapshot(cursor)
        boundary = SourceSnapshot(0, {}, position, dt.datetime.now(dt.UTC)).boundary()
        assert boundary
        cursor.execute(
            f"SELECT COUNT(*) FROM `{env.schema}`.accounts"
        )  # the snapshot's read view starts here

        with running(
            ClusterCapture(cluster, env.replication(), env.store(), FAST)
        ):  # a steady load: no false alarm
            insert_accounts(env, [7])
            run_sql(env, "DELETE FROM `{schema}`.accounts WHERE id = 1")
            run_sql(env, "UPDATE `{schema}`.accounts SET nick = 'changed', money = 0 WHERE id = 2")
            wait_caught_up(env)
        catching_up = check()
        assert catching_up[ROW_COUNT].passed and catching_up[ROW_COUNT].metadata["exact"].value is False
        assert catching_up[CONTENT].passed and catching_up[CONTENT].metadata["exact"].value is False
        load()
        targets = TableTargets(
            bigquery_client(local_stack.settings.bigquery_project, endpoint=local_stack.bigquery.endpoint),
            table,
        )
        then = compare_content(cursor, targets, cluster, table, boundary, 2_000_000)
        assert then.source.rows == 6 == then.bigquery.rows and not then.mismatched_chunks  # rolled back
        now = compare_content(cursor, targets, cluster, table, "9" * 35, 2_000_000)
        assert now.mismatched_chunks == ["0"] and now.differing == [  # not rolled back: the later changes
            "id=1: only at the source",
            "id=2: column(s) money, nick differ",
            "id=7: only in BigQuery",
        ]
    caught_up = check()
    assert caught_up[ROW_COUNT].metadata["exact"].value is True
    assert caught_up[CONTENT].passed and caught_up[CONTENT].metadata["exact"].value is True

    loader = accounts_stream_loader(local_stack, env, env.schema)
    assert_current_state_equals_source(loader, env)
    loader.bq.query(  # a change held twice: the streaming duplicate check catches it
        f"INSERT INTO {loader.ref('accounts_changelog')} SELECT * FROM {loader.ref('accounts_changelog')} LIMIT 1"
    ).result()
    duplicated = check()[NO_DUPLICATES]
    assert not duplicated.passed and duplicated.metadata["duplicated_changes"].value == 1


HOSTILE = """CREATE TABLE `{schema}`.hostile (id INT NOT NULL PRIMARY KEY, y YEAR NULL,
  u VARCHAR(8) CHARACTER SET utf16 NULL, bits BIT(10) NULL, d DATE NULL, f DOUBLE NULL, price DECIMAL(12,3) NULL,
  t TIME(2) NULL, raw BINARY(3) NULL, ts TIMESTAMP(3) NULL DEFAULT NULL)"""


def test_content_check_names_each_divergence_the_row_count_misses(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The value classes that once diverged with the right row count (YEAR 0 -> 1900, a UTF-16 column garbled, a
    column added with a default that BigQuery does not hold): content_matches_source fails on each, naming the key
    and the column, and passes again once the table is rebuilt."""
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)
    env = new_env(local_stack, "poker_accounts")
    run_sql(
        env,
        HOSTILE,
        "INSERT INTO `{schema}`.hostile VALUES (1, 0, 'ĀĒ', b'1010101010', '2026-02-28', 1.5, 100.000, "
        "'-838:59:59.00', 'a', '2026-11-30 10:00:00.125'), (2, 2024, 'abc', 0, '0000-00-00', NULL, 0.5, '00:00:00.01', "
        "'', '1970-01-01 00:00:01'), (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    )
    table = env.table("hostile", ["id"]).model_copy(update={"load_mode": "batch"})  # planted by DML
    cluster = env.mapping(table)
    capture_changes(
        env, cluster, "UPDATE `{schema}`.hostile SET y = 0, u = 'ĒĀ😀' WHERE id = 2"
    )  # the binlog path
    resources = pipeline_resources(env)
    asset = build_table_assets([(cluster, table)], Settings.load())
    checks = build_table_checks(cluster, table, Settings.load())
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    bq = bigquery_client(local_stack.settings.bigquery_project, endpoint=local_stack.bigquery.endpoint)
    ref = quote_bigquery(bq.project, env.schema, "hostile")

    def rebuild() -> None:
        assert dg.materialize([asset], partition_key=today, resources=resources, instance=instance).success

    def check() -> dict[str, dg.AssetCheckEvaluation]:
        selection = dg.AssetSelection.checks(
            *(dg.AssetCheckKey(bigquery_asset_key(table), name) for name in (ROW_COUNT, CONTENT))
        )
        result = dg.materialize([asset, checks], selection=selection, resources=resources, instance=instance)
        return {e.check_name: e for e in result.get_asset_check_evaluations()}

    def plant(sql: str) -> None:
        params = [
            bigquery.ScalarQueryParameter("garbled", "STRING", "\x01ሁ"),
            bigquery.ScalarQueryParameter("short", "BYTES", b"a"),
        ]
        used = [p for p in params if f"@{p.name}" in sql]
        bq.query(sql, job_config=bigquery.QueryJobConfig(query_parameters=used)).result()

    rebuild()
    steady = check()[CONTENT]
    assert steady.passed and steady.metadata["exact"].value is True, steady.metadata
    assert (
        steady.metadata["source_rows_compared"].value == 3 == steady.metadata["bigquery_rows_compared"].value
    )
    assert steady.metadata["columns_compared"].value == 9
    assert set(steady.metadata["columns_not_compared"].value) == {"f"}  # DOUBLE: approximate

    for planted, column, key in (
        (f"UPDATE {ref} SET y = 1900 WHERE id = 2", "y", 2),  # the binlog reader's YEAR 0000
        (f"UPDATE {ref} SET u = @garbled WHERE id = 1", "u", 1),  # UTF-16 decoded as UTF-8
        (
            f"UPDATE {ref} SET d = NULL, raw = @short WHERE id = 1",
            "d, raw",
            1,
        ),  # a lost date, unpadded BINARY
    ):
        plant(planted)
        results = check()
        assert results[ROW_COUNT].passed  # the row count cannot see it
        found = results[CONTENT]
        assert not found.passed and found.metadata["exact"].value is True
        assert found.metadata["first_differences"].value == [f"id={key}: column(s) {column} differ"]
        assert "MISMATCH" in (found.description or "") and f"id={key}" in (found.description or "")
        assert found.severity == dg.AssetCheckSeverity.WARN
        rebuild()
        assert check()[CONTENT].passed

    # a column added at the source with a default: every existing row holds it there at once, with no row event -
    # BigQuery does not have it until each row changes; the content check names the rows
    capture_changes(
        env, cluster, "ALTER TABLE `{schema}`.hostile ADD COLUMN c VARCHAR(4) NOT NULL DEFAULT 'x'"
    )
    added = check()[CONTENT]
    assert not added.passed and added.metadata["exact"].value is True
    assert added.metadata["first_differences"].value == [f"id={i}: column(s) c differ" for i in (1, 2, 3)]
    # ... until the re-snapshot the capture asked for has run (the resnapshot_requests sensor launches it)
    assert len(run_requested_resnapshots(cluster, resources, instance)) == 1
    healed = check()[CONTENT]
    assert healed.passed and healed.metadata["exact"].value is True, healed.metadata
    assert healed.metadata["columns_compared"].value == 10
