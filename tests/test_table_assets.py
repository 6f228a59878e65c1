"""One partitioned BigQuery asset per mapped table, with lineage, materialized for real through the loader."""

from __future__ import annotations

import datetime as dt
import threading

import dagster as dg
import pytest

from cdc.settings import Settings
from cdc_assets.load_run import LOADER, load_run_config
from cdc_assets.resources import BigQueryCdcResource
from cdc_assets.tables import build_table_assets, daily_partitions
from definitions import build_definitions
from local_stack.stack import LocalStack
from tests.support.accounts import (
    DDL,
    accounts_loader,
    accounts_stream_loader,
    assert_changelog_has_no_duplicates,
    assert_current_state_equals_source,
    insert_accounts,
)
from tests.support.capture import capture_changes, landed_keys, landing_resource, new_env, run_sql
from tests.support.runs import end_once_waited_for


def test_every_mapped_table_has_source_landing_and_bigquery_assets() -> None:
    defs = build_definitions()
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    bigquery = [k for k in specs if k.path[0] == "bigquery"]
    assert len(bigquery) == 70 and len([k for k in specs if k.path[0] == "s3_landing"]) == 70
    bets = specs[dg.AssetKey(["bigquery", "slots", "bets"])]
    assert bets.group_name == "slots_play" and "bigquery" in bets.kinds
    daily = daily_partitions(Settings.load())
    assert bets.partitions_def == daily
    assert {d.asset_key for d in bets.deps} == {
        dg.AssetKey(["s3_landing", "slots_play", "slots_play", "bets"])
    }
    landing = specs[dg.AssetKey(["s3_landing", "slots_play", "slots_play", "bets"])]
    assert {d.asset_key for d in landing.deps} == {dg.AssetKey(["mysql", "slots_play", "slots_play", "bets"])}
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert today in daily.get_partition_keys()  # today's partition exists (end_offset=1)


def test_materializing_a_partition_loads_the_landed_files(local_stack: LocalStack) -> None:
    """Batch mode: a backfill of the day through load job + MERGE, with the inline duplicate check."""
    env = new_env(local_stack, "roulette_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 4))
    mapping = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"})
    capture_changes(
        env,
        env.mapping(mapping),
        "UPDATE `{schema}`.accounts SET n = 99 WHERE id = 1",
        "DELETE FROM `{schema}`.accounts WHERE id = 2",
    )
    target = mapping.model_copy(update={"target": "asset_test.accounts", "load_mode": "batch"})
    cluster = env.mapping(target)
    asset = build_table_assets([(cluster, target)], Settings.load())
    resources = {
        "landing": landing_resource(local_stack, env.prefix),
        "bigquery": BigQueryCdcResource(
            project=local_stack.settings.bigquery_project, endpoint=local_stack.bigquery.endpoint
        ),
    }
    today = dt.datetime.now(dt.UTC).date().isoformat()
    environment = local_stack.environment()
    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.setenv(key, environment[key])
        instance = dg.DagsterInstance.ephemeral()
        result = dg.materialize(
            [asset], partition_key=today, resources=resources, instance=instance
        )  # a backfill: no files named
        again = dg.materialize(
            [asset], partition_key=today, resources=resources
        )  # running it twice changes nothing
    assert result.success and again.success
    metadata = result.asset_materializations_for_node(LOADER)[0].metadata
    assert metadata["files"].value >= 2 and metadata["new_changes"].value == metadata["rows"].value
    values = {name: entry.value for name, entry in metadata.items()}
    files = values["files"]
    logged = "\n".join(entry.user_message for entry in instance.all_logs(result.run_id))
    assert f"(files): {files} of ~{files} (100 %)" in logged, logged  # the backfill reports its progress
    assert (values["rows_I"], values["rows_U"], values["rows_D"]) == (3, 1, 1) and values["bytes"] > 0
    assert (
        0 <= values["lag_s"] <= values["latency_p50_s"] <= values["latency_p95_s"] <= values["latency_max_s"]
    )
    assert values["load_jobs_today"] >= 1 and values["projected_load_jobs_today"] >= values["load_jobs_today"]
    assert again.asset_materializations_for_node(LOADER)[0].metadata["new_changes"].value == 0
    [check] = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["duplicated_changes"].value == 0
    loader = accounts_loader(local_stack, env, "asset_test")
    assert_changelog_has_no_duplicates(loader)
    assert_current_state_equals_source(loader, env)

    # a duplicate written behind the pipeline's back fails the blocking check, naming the numbers
    loader.bq.query(
        f"INSERT INTO {loader.ref('accounts_changelog')} SELECT * FROM {loader.ref('accounts_changelog')} LIMIT 1"
    ).result()
    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            patch.setenv(key, environment[key])
        broken = dg.materialize([asset], partition_key=today, resources=resources, raise_on_error=False)
    [failed] = broken.get_asset_check_evaluations()
    assert not failed.passed and failed.metadata["duplicated_changes"].value == 1
    assert not broken.success  # blocking ERROR check fails the run


def test_streaming_a_partition_loads_the_landed_files_through_the_write_api(local_stack: LocalStack) -> None:
    """Streaming mode: the files the sensor names, then a backfill of the day, through the Storage Write API."""
    env = new_env(local_stack, "roulette_play")
    run_sql(env, DDL)
    insert_accounts(env, range(1, 4))
    mapping = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"})
    capture_changes(
        env,
        env.mapping(mapping),
        "UPDATE `{schema}`.accounts SET n = 99 WHERE id = 1",
        "DELETE FROM `{schema}`.accounts WHERE id = 2",
    )
    target = mapping.model_copy(update={"target": "stream_asset_test.accounts", "load_mode": "streaming"})
    asset = build_table_assets([(env.mapping(target), target)], Settings.load())
    assert not asset.check_specs_by_output_name  # streaming checks duplicates in table_checks, not per load
    resources = {
        "landing": landing_resource(local_stack, env.prefix),
        "bigquery": BigQueryCdcResource(
            project=local_stack.settings.bigquery_project,
            endpoint=local_stack.bigquery.endpoint,
            write_endpoint=local_stack.bigquery.write_endpoint,
        ),
    }
    today = dt.datetime.now(dt.UTC).date().isoformat()
    named = sorted(landed_keys(env, "accounts"))
    instance = dg.DagsterInstance.ephemeral()
    # a run that loads this table already: the step waits until it has ended (one writer per table)
    earlier = dg.DagsterRun(
        job_name="__ASSET_JOB",
        run_id="earlier-load-run",
        status=dg.DagsterRunStatus.STARTED,
        asset_selection=frozenset(asset.keys),
    )
    instance.add_run(earlier)
    ended = threading.Thread(target=end_once_waited_for, args=(instance, earlier), daemon=True)
    ended.start()

    def load_named() -> dg.ExecuteInProcessResult:
        """A load run as the sensor requests it: the table's landed files named."""
        return dg.materialize(
            [asset],
            partition_key=today,
            resources=resources,
            instance=instance,
            run_config=load_run_config({target.target: (named, [])}),
        )

    loaded = load_named()
    ended.join()
    waited = [
        e for e in instance.all_logs(loaded.run_id) if "waiting for run(s) earlier-load-run" in e.user_message
    ]
    [materialized] = instance.all_logs(loaded.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    [failed] = instance.all_logs(earlier.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert waited and waited[0].timestamp < failed.timestamp <= materialized.timestamp
    values = {
        name: entry.value
        for name, entry in loaded.asset_materializations_for_node(LOADER)[0].metadata.items()
    }
    assert values["load_mode"] == "streaming" and values["files"] == len(named)
    assert values["new_changes"] == values["rows"] and (
        values["rows_I"],
        values["rows_U"],
        values["rows_D"],
    ) == (3, 1, 1)
    assert values["write_api_calls"] >= 3 and values["write_api_bytes_today"] >= values["write_api_bytes"] > 0
    assert "load_jobs_today" not in values and loaded.get_asset_check_evaluations() == []
    assert 0 <= values["lag_s"] <= values["latency_p50_s"] <= values["latency_max_s"]
    loader = accounts_stream_loader(local_stack, env, "stream_asset_test")
    assert_current_state_equals_source(loader, env)

    def logged_lines(run_id: str) -> list[str]:
        return [entry.user_message for entry in instance.all_logs(run_id) if not entry.is_dagster_event]

    # the first load opened the table's stream: its own line says so
    assert [
        line for line in logged_lines(loaded.run_id) if "(streaming):" in line and "re-synchronised" in line
    ]
    # a routine streaming load (here: the same files redelivered) logs no line of its own - a storage write each -
    # but one line per run for all its tables
    redelivered = load_named()
    lines = logged_lines(redelivered.run_id)
    assert not [line for line in lines if "(streaming):" in line], lines
    assert [line for line in lines if line.startswith("1 table(s) streamed in ") and "0 file(s)" in line], (
        lines
    )
    backfill = dg.materialize(
        [asset], partition_key=today, resources=resources, instance=instance
    )  # no files named
    metadata = backfill.asset_materializations_for_node(LOADER)[0].metadata
    assert metadata["rebuild"].value and metadata["new_changes"].value == 0  # every change was there already
    logged = "\n".join(logged_lines(backfill.run_id))
    assert f"(files): {len(named)} of ~{len(named)} (100 %)" in logged, logged
    assert "(streaming): " in logged and "(rebuild)" in logged  # a backfill's load has its own line
    assert assert_changelog_has_no_duplicates(loader) == values["rows"]
    assert_current_state_equals_source(loader, env)
