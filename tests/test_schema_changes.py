"""An incompatible type change at the source stops only that table, at the change, with a clear error and an
alert; the remedy the error names (drop, re-snapshot) resumes it. Real MariaDB, capture, moto and BigQuery server."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdc.mappings import Mappings
from cdc.settings import Settings
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import LOADER, load_run_config
from cdc_assets.resnapshot import build_resnapshot_job
from cdc_assets.tables import build_table_assets
from local_stack.stack import LocalStack
from sensors.alerts import AlertWebhookResource, alert_failed_runs, error_text
from tests.support.accounts import DDL, accounts_loader, assert_current_state_equals_source, insert_accounts
from tests.support.capture import (
    CaptureEnv,
    capture_changes,
    landed_keys,
    new_env,
    pipeline_resources,
    run_sql,
)
from tests.support.webhook import Receiver


def _other_rows(bq: Any, env: CaptureEnv) -> set[tuple[int, str]]:
    rows = bq.query(f"SELECT id, v FROM `{env.schema}.other`").result()
    return {(int(r.id), str(r.v)) for r in rows}


def _source_other(env: CaptureEnv) -> set[tuple[int, str]]:
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT id, v FROM `{env.schema}`.other")
        return {(int(i), str(v)) for i, v in cursor.fetchall()}


@pytest.mark.parametrize("mode", ["streaming", "batch"])
def test_an_incompatible_type_change_stops_only_that_table_and_a_resnapshot_resumes_it(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch, receiver: Receiver, mode: str
) -> None:
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)
    env = new_env(local_stack, "slots_accounts")
    run_sql(
        env,
        DDL,
        "CREATE TABLE `{schema}`.other (id INT PRIMARY KEY, v VARCHAR(10))",
        "INSERT INTO `{schema}`.other VALUES (1, 'a'), (2, 'b')",
    )
    insert_accounts(env, range(1, 4))
    accounts = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}, load_mode=mode)
    other = env.table("other", ["id"], load_mode=mode)
    cluster = env.mapping(accounts, other)
    capture_changes(env, cluster)

    resources = pipeline_resources(env)
    tables = {"accounts": accounts, "other": other}
    loader_asset = build_table_assets([(cluster, accounts), (cluster, other)], Settings.load())
    instance = dg.DagsterInstance.ephemeral()
    today = dt.datetime.now(dt.UTC).date().isoformat()

    def load(keys: dict[str, list[str]]) -> dg.ExecuteInProcessResult:
        """One run for both tables, as the sensor requests it."""
        return dg.materialize(
            [loader_asset],
            partition_key=today,
            resources=resources,
            instance=instance,
            run_config=load_run_config({tables[t].target: (k, []) for t, k in keys.items()}),
            raise_on_error=False,
        )

    loaded = {t: landed_keys(env, t) for t in tables}
    assert load({t: sorted(k) for t, k in loaded.items()}).success
    loader = accounts_loader(local_stack, env, env.schema)
    assert_current_state_equals_source(loader, env)

    # a change, then the source changes a column's type; both tables change, and all lands in one run's batch
    capture_changes(
        env,
        cluster,
        "UPDATE `{schema}`.accounts SET n = 8 WHERE id = 2",
        "ALTER TABLE `{schema}`.accounts MODIFY n VARCHAR(20) NULL",
        "UPDATE `{schema}`.accounts SET n = 'seven' WHERE id = 1",
        "UPDATE `{schema}`.other SET v = 'c' WHERE id = 2",
        "INSERT INTO `{schema}`.other VALUES (3, 'd')",
    )
    new = {t: sorted(landed_keys(env, t) - loaded[t]) for t in tables}
    body = env.s3().get_object(Bucket=local_stack.settings.bucket, Key=new["accounts"][-1])["Body"].read()
    assert pq.read_schema(io.BytesIO(body)).field("n").type == pa.string()  # the capture followed the MODIFY
    first = env.s3().get_object(Bucket=local_stack.settings.bucket, Key=new["accounts"][0])["Body"].read()
    assert pq.read_schema(io.BytesIO(first)).field("n").type == pa.int32()  # the update before it: old type

    result = load(new)
    assert not result.success
    failure = result.failure_data_for_node(LOADER)
    assert failure is not None
    message = error_text(failure.error)
    for expected in ("incompatible type change", "column n is INTEGER", "but STRING", new["accounts"][-1]):
        assert expected in message, message
    assert (
        new["accounts"][0] not in message
    )  # the file before the change loaded: the table stops at the change
    assert "resnapshot_table job for " + accounts.target in message
    # ... the other table went on in the same run, and the stopped one is untouched
    assert [m.asset_key for m in result.asset_materializations_for_node(LOADER)] == [
        bigquery_asset_key(other)
    ]
    assert _other_rows(loader.bq, env) == _source_other(env) == {(1, "a"), (2, "c"), (3, "d")}
    loaded_n = {int(r.id): r.n for r in loader.bq.query(f"SELECT id, n FROM {loader.ref('accounts')}")}
    assert loaded_n[2] == 8 and loaded_n[1] != "seven"  # up to the change, not past it

    # ... and the alert names the table and the change
    context = dg.build_run_status_sensor_context(
        sensor_name="alert_failed_runs",
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        resources={"alerts": AlertWebhookResource(url=receiver.url)},
    ).for_run_failure()
    alert_failed_runs(context)
    assert "incompatible type change" in receiver.texts() and "column n" in receiver.texts()

    # the remedy the error names: drop both tables, re-snapshot; then the retried files load
    for name in ("accounts", "accounts_changelog"):
        loader.bq.delete_table(f"{loader.project}.{env.schema}.{name}")
    job = build_resnapshot_job(Mappings(Path("."), (cluster,)), Settings.load())
    assert job.execute_in_process(
        run_config={"ops": {"resnapshot_from_source": {"config": {"table": accounts.target}}}},
        resources=resources,
        instance=instance,
    ).success
    assert loader.bq.get_table(f"{loader.project}.{env.schema}.accounts").schema[2].field_type == "STRING"
    assert_current_state_equals_source(loader, env)
    retried = load({"accounts": new["accounts"], "other": new["other"]})  # the sensor's retry
    assert retried.success, error_text(retried.failure_data_for_node(LOADER).error)
    assert_current_state_equals_source(loader, env)
