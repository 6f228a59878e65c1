"""Asset checks (row counts at one snapshot, landed vs loaded files), partition backfills that rebuild a day, and
the alerts they raise - against the real servers."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import dagster as dg
import pytest

from capture.service import ClusterCapture
from cdc.settings import Settings
from cdc_assets.checks import FILES_LOADED, ROW_COUNT, build_table_checks
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import LOADER, NO_DUPLICATES, load_run_config
from cdc_assets.resources import LandingResource
from cdc_assets.tables import build_table_assets
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

    # a steady load: changes captured but not loaded yet are no false alarm - the check says it is not exact
    with running(ClusterCapture(cluster, env.replication(), env.store(), FAST)):
        insert_accounts(env, [7])
        run_sql(env, "DELETE FROM `{schema}`.accounts WHERE id = 1")
        wait_caught_up(env)
    catching_up = check()[ROW_COUNT]
    assert catching_up.passed and catching_up.metadata["exact"].value is False
    assert "landed, not loaded yet" in json.dumps(catching_up.metadata["waiting_for"].value)
    assert backfill()["new_changes"] == 2
    assert check()[ROW_COUNT].metadata["exact"].value is True

    # a row deleted behind the pipeline's back: the check fails, naming both counts
    loader.bq.query(f"DELETE FROM {loader.ref('accounts')} WHERE id = 2").result()
    broken = check()[ROW_COUNT]
    assert not broken.passed and broken.metadata["exact"].value is True
    assert (
        broken.metadata["source_rows"].value == 5 and broken.metadata["bigquery_rows_at_snapshot"].value == 4
    )
    assert "MISMATCH" in (broken.description or "")

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
    assert {spec.name for spec in checks.check_specs} == {ROW_COUNT, FILES_LOADED, NO_DUPLICATES}
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

    with running(
        ClusterCapture(cluster, env.replication(), env.store(), FAST)
    ):  # a steady load: no false alarm
        insert_accounts(env, [7])
        run_sql(env, "DELETE FROM `{schema}`.accounts WHERE id = 1")
        wait_caught_up(env)
    catching_up = check()[ROW_COUNT]
    assert catching_up.passed and catching_up.metadata["exact"].value is False
    load()
    assert check()[ROW_COUNT].metadata["exact"].value is True

    loader = accounts_stream_loader(local_stack, env, env.schema)
    assert_current_state_equals_source(loader, env)
    loader.bq.query(  # a change held twice: the streaming duplicate check catches it
        f"INSERT INTO {loader.ref('accounts_changelog')} SELECT * FROM {loader.ref('accounts_changelog')} LIMIT 1"
    ).result()
    duplicated = check()[NO_DUPLICATES]
    assert not duplicated.passed and duplicated.metadata["duplicated_changes"].value == 1
