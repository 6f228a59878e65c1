"""End to end with a real Dagster instance: MariaDB -> capture -> S3 -> SQS -> sensor -> runs -> BigQuery."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cdc.clients import aws_client
from local_stack.dagster import processes_of_instance
from local_stack.stack import LocalStack
from tests.support.accounts import (
    DDL,
    accounts_loader,
    assert_changelog_has_no_duplicates,
    assert_current_state_equals_source,
    insert_accounts,
)
from tests.support.browser import look_at_table
from tests.support.capture import landed_keys, new_env, run_sql, write_mapping
from tests.support.pipeline import running_pipeline, wait_until_equal
from tests.support.webhook import Receiver

ROOT = Path(__file__).resolve().parent.parent


def _sqs(stack: LocalStack) -> Any:
    return aws_client("sqs", stack.environment())


def _s3_event(key: str) -> dict[str, Any]:
    return {
        "Records": [
            {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"object": {"key": key}}}
        ]
    }


def _forked_run_workers_cpu(home: Path) -> int:
    """The CPU ticks of the ended children of the local code server's fork server (which has imported Dagster and
    the code location): its only children are run workers (local_stack/run_worker_preload)."""
    for pid in processes_of_instance(home):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if "multiprocessing.forkserver" in command and "'definitions'" in command:
            return int(stat[13]) + int(stat[14])  # cutime + cstime: children that ran and were reaped
    raise AssertionError(f"no pre-loaded fork server among the processes of the Dagster instance at {home}")


def _queued(sqs: Any, queue: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=names)["Attributes"]
    return sum(int(attributes[name]) for name in names)


@pytest.mark.parametrize(("instance_storage", "mode"), [("sqlite", "streaming"), ("postgres", "batch")])
def test_changes_reach_bigquery_through_the_sensor_and_dagster_runs(
    local_stack: LocalStack,
    tmp_path: Path,
    receiver: Receiver,
    request: pytest.FixtureRequest,
    instance_storage: str,
    mode: str,
) -> None:
    env = new_env(local_stack, "poker_play")
    env.prefix = local_stack.settings.prefix  # the prefix whose S3 events reach the queue
    run_sql(env, DDL)
    insert_accounts(env, range(1, 4))
    folder = tmp_path / "mappings"
    write_mapping(env, folder, "poker_play", ["accounts"])  # target: <schema>.accounts
    extra = {"CDC_ALERT_WEBHOOK_URL": receiver.url, "CDC_LOAD_MODE": mode}
    if instance_storage == "postgres":  # the production instance file, on Debian's PostgreSQL
        extra.update(request.getfixturevalue("postgres").environment())
        extra["CDC_DAGSTER_INSTANCE_YAML"] = str(ROOT / "deploy" / "postgres" / "dagster.yaml")
    with running_pipeline(local_stack, folder, extra) as pipeline:
        cdc_run, port = pipeline.cdc, pipeline.port
        run_sql(
            env,
            "UPDATE `{schema}`.accounts SET nick = 'changed 🎉', money = 1.5 WHERE id = 1",
            "UPDATE `{schema}`.accounts SET id = 30 WHERE id = 3",
            "DELETE FROM `{schema}`.accounts WHERE id = 2",
        )
        insert_accounts(env, [9])
        run_sql(  # a new source column appears in BigQuery by itself
            env,
            "ALTER TABLE `{schema}`.accounts ADD COLUMN note VARCHAR(20) NULL",
            "UPDATE `{schema}`.accounts SET note = 'added later' WHERE id = 1",
        )
        loader = accounts_loader(local_stack, env, env.schema)
        wait_until_equal(lambda: assert_current_state_equals_source(loader, env), pipeline)
        changes = assert_changelog_has_no_duplicates(loader)
        # the load runs' workers were forked from the code server's pre-loaded fork server, not spawned (a worker
        # counts once it has ended and been reaped: the run that made the tables equal may still be finishing)
        home, deadline = local_stack.state_dir / "dagster" / "home", time.monotonic() + 120
        while _forked_run_workers_cpu(home) == 0:
            assert time.monotonic() < deadline, "no run worker forked from the fork server has ended in 120 s"
            time.sleep(1)

        # S3 delivers events at least once: every landed file's event arrives twice more (one SNS-wrapped, one
        # in a two-record message), and loads that ran already are not run again - nothing is doubled
        sqs = _sqs(local_stack)
        queue = local_stack.environment()["CDC_SQS_QUEUE_URL"]
        landed = sorted(landed_keys(env, "accounts"))
        for key in landed:
            sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(_s3_event(key)))
            wrapped = {"Type": "Notification", "Message": json.dumps(_s3_event(key))}
            sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(wrapped))
        deadline = time.monotonic() + 90
        while _queued(sqs, queue):
            assert time.monotonic() < deadline, "the sensor did not consume the redelivered events"
            time.sleep(1)
        assert assert_changelog_has_no_duplicates(loader) == changes
        assert_current_state_equals_source(loader, env)

        # a poison file: the run dead-letters it and the webhook hears about it, naming the file
        day, stamp = time.strftime("%Y/%m/%d", time.gmtime()), time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        poison = f"{env.prefix}/{env.schema}/accounts/{day}/{stamp}9999.parquet"  # a DMS name, not Parquet
        env.s3().put_object(Bucket=local_stack.settings.bucket, Key=poison, Body=b"not parquet")
        deadline = time.monotonic() + 120
        while poison not in receiver.texts():
            assert time.monotonic() < deadline, f"no alert for {poison}; received: {receiver.texts()[-2000:]}"
            time.sleep(2)
        assert "not a readable Parquet file" in receiver.texts()
        assert_current_state_equals_source(loader, env)

        # `cdc status` shows the table as it is: loaded changes today by op, the poison file waiting and dead-lettered,
        # the inline check's last result from the instance
        target = f"{env.schema}.accounts"
        changelog = loader.ref("accounts_changelog")
        by_op = {
            r.op: r.n
            for r in loader.bq.query(
                f"SELECT _op AS op, COUNT(*) AS n FROM {changelog} WHERE DATE(_commit_ts) = CURRENT_DATE() GROUP BY 1"
            ).result()
        }
        deadline = time.monotonic() + 60
        while True:  # the alert sensor hides dead letters for a few seconds while it reads them
            [status] = json.loads(cdc_run("status", "--json", "--table", target))["tables"]
            if status["dead_letters"] >= 1 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert status["cluster"] == "poker_play" and status["dead_letters"] >= 1
        assert status["rows_today"] == {op: by_op.get(op, 0) for op in "IUD"} and by_op["U"] >= 1
        assert status["last_commit_loaded"] and 0 <= status["lag_s"] < 600
        assert status["files_waiting"] == 1  # the poison file
        if mode == "streaming":
            # its duplicate check runs with the table checks (a few tables a minute, which may have run it
            # already): run them now and see this run's result
            asked = dt.datetime.now(dt.UTC).replace(microsecond=0)
            checked = pipeline.cdc_result("checks")
            assert "no_duplicate_changes       ok" in checked.stdout, checked.stdout + checked.stderr
            [status] = json.loads(cdc_run("status", "--json", "--table", target))["tables"]
            assert dt.datetime.fromisoformat(status["checks"]["no_duplicate_changes"]["at"]) >= asked
        assert status["checks"]["no_duplicate_changes"]["passed"] is True
        table_line = cdc_run("status", "--table", target).splitlines()[1]
        assert table_line.startswith(target) and "dup:ok" in table_line

        # the Dagster UI in a real browser (headless Chromium): the cluster's lineage, the table's partitions and
        # its checks are displayed; screenshots go to CDC_SCREENSHOT_DIR (or the test's folder)
        screenshots = Path(os.environ.get("CDC_SCREENSHOT_DIR") or tmp_path / "screenshots")
        texts = look_at_table(
            f"http://127.0.0.1:{port}",
            graph_texts=["accounts", "MySQL", "S3", "BigQuery"],  # the kinds of source, landing and table
            asset_path=["bigquery", env.schema, "accounts"],
            check_names=["no_duplicate_changes", "row_count_matches_source", "landed_files_loaded"],
            partition=time.strftime("%Y-%m-%d", time.gmtime()),
            out=screenshots,
        )
        assert texts["asset-graph"].count("accounts") >= 3  # source, landing and BigQuery nodes
        assert {p.name for p in screenshots.glob("*.png")} == {
            "asset-graph.png",
            "partitions.png",
            "checks.png",
        }
        if instance_storage == "postgres":  # the runs and their events were stored in PostgreSQL
            server = request.getfixturevalue("postgres")
            assert int(server.scalar("SELECT COUNT(*) FROM runs")) >= 2
            materializations = (
                "SELECT COUNT(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
            )
            assert int(server.scalar(materializations)) >= 2
