"""The SQS sensor against moto: S3 events -> runs that load the named files and delete their messages."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from cdc.landing import PoisonMessage, parse_message
from cdc.mappings import ClusterMapping, Mappings, TableMapping
from cdc.settings import Settings
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import LOADER, KeptInvisible
from cdc_assets.resources import BigQueryCdcResource
from cdc_assets.tables import build_table_assets
from local_stack.stack import LocalStack
from sensors.sqs_sensor import build_sqs_sensor
from tests.support.accounts import (
    DDL,
    accounts_loader,
    assert_changelog_has_no_duplicates,
    assert_current_state_equals_source,
    insert_accounts,
)
from tests.support.capture import capture_changes, drain_queue, new_env, notified_landing, run_sql


def _message(body: Any, receive_count: int = 1) -> dict[str, Any]:
    return {
        "MessageId": "m1",
        "ReceiptHandle": "r1",
        "Body": body if isinstance(body, str) else json.dumps(body),
        "Attributes": {"ApproximateReceiveCount": str(receive_count)},
    }


def _event(key: str) -> dict[str, Any]:
    return {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": key}}}]}


def test_parse_plain_sns_wrapped_test_events_and_encoded_keys() -> None:
    assert parse_message(_message(_event("cdc%2Fs%2Ft%2FLOAD00000001.parquet"))).keys == [
        "cdc/s/t/LOAD00000001.parquet"
    ]
    wrapped = {"Type": "Notification", "Message": json.dumps(_event("cdc/s/t/a+b.parquet"))}
    assert parse_message(_message(wrapped)).keys == ["cdc/s/t/a b.parquet"]
    assert parse_message(_message({"Service": "Amazon S3", "Event": "s3:TestEvent"})).test_event
    for poison in (
        "not json",
        json.dumps([1, 2]),
        json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}),
        json.dumps(
            {"source": "aws.s3", "detail-type": "Object Created", "detail": {"bucket": {"name": "b"}}}
        ),
        json.dumps(
            {"source": "aws.ec2", "detail-type": "EC2 Instance State-change Notification", "detail": {}}
        ),
    ):
        with pytest.raises(PoisonMessage, match="m1"):
            parse_message(_message(poison))


def _eventbridge(detail_type: str, key: str) -> dict[str, Any]:
    """An S3 event as an EventBridge rule delivers it to SQS (docs.aws.amazon.com/AmazonS3/latest/userguide/ev-events)."""
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": detail_type,
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2026-11-30T00:00:00Z",
        "region": "eu-west-1",
        "resources": ["arn:aws:s3:::cdc-landing"],
        "detail": {
            "version": "0",
            "bucket": {"name": "cdc-landing"},
            "object": {"key": key, "size": 5, "etag": "b1946ac92492d2347c6235b4d2611184"},
            "reason": "PutObject",
        },
    }


def test_eventbridge_s3_events_name_their_file_like_s3_notifications() -> None:
    key = "cdc/games/bets/2026/11/30/20261130-081522123.parquet"
    parsed = parse_message(_message(_eventbridge("Object Created", key)))
    assert parsed.keys == [key] and not parsed.test_event
    # EventBridge does not URL-encode keys: a '+' or '%' in a key is the key's own character
    assert parse_message(_message(_eventbridge("Object Created", "cdc/s/t/a+b%20.parquet"))).keys == [
        "cdc/s/t/a+b%20.parquet"
    ]
    assert parse_message(_message(_eventbridge("Object Deleted", key))).keys == []


@pytest.mark.parametrize("mode", ["streaming", "batch"])
def test_sensor_runs_load_exactly_once_acknowledge_and_dead_letter_the_rest(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    environment = local_stack.environment()
    for key, value in environment.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    landing = notified_landing(local_stack)
    sqs = landing.sqs()
    drain_queue(sqs, landing.queue_url)
    drain_queue(sqs, landing.dead_letter_queue_url)

    env = new_env(local_stack, "slots_accounts")
    env.prefix = local_stack.settings.prefix  # the notified landing prefix
    run_sql(env, DDL)
    insert_accounts(env, range(1, 5))
    mapping = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}).model_copy(
        update={"target": f"sensor_test_{mode}.accounts", "load_mode": mode}
    )
    cluster = env.mapping(mapping)
    capture_changes(
        env,
        cluster,
        "UPDATE `{schema}`.accounts SET n = 1 WHERE id = 1",
        "DELETE FROM `{schema}`.accounts WHERE id = 4",
    )
    s3 = landing.s3()
    s3.put_object(Bucket=landing.bucket, Key=f"cdc/{env.schema}/accounts/notes.txt", Body=b"not a data file")
    s3.put_object(Bucket=landing.bucket, Key=f"cdc/{env.schema}/unmapped/LOAD00000001.parquet", Body=b"x")
    time.sleep(0.5)

    mappings = Mappings(directory=env.stack.mappings.directory, clusters=(cluster,))
    sensor = build_sqs_sensor(mappings, [bigquery_asset_key(mapping)], Settings.load())
    asset = build_table_assets([(cluster, mapping)], Settings.load())
    bigquery = BigQueryCdcResource(
        project=local_stack.settings.bigquery_project,
        endpoint=local_stack.bigquery.endpoint,
        write_endpoint=local_stack.bigquery.write_endpoint,
    )
    instance = dg.DagsterInstance.ephemeral()

    def tick() -> list[dg.RunRequest]:
        context = dg.build_sensor_context(instance=instance, resources={"landing": landing})
        result = sensor(context)
        return list(result.run_requests or [])

    def run(requests: list[dg.RunRequest]) -> list[int]:
        new = []
        for request in requests:
            outcome = dg.materialize(
                [asset],
                partition_key=request.partition_key,
                run_config=request.run_config,
                resources={"landing": landing, "bigquery": bigquery},
            )
            assert outcome.success
            new.append(outcome.asset_materializations_for_node(LOADER)[0].metadata["new_changes"].value)
        return new

    requests = tick()
    assert requests, "the sensor saw no landed files"
    assert all(r.run_key and r.partition_key for r in requests)
    files = [
        k
        for r in requests
        for t in r.run_config["ops"][LOADER]["config"]["tables"].values()
        for k in t["keys"]
    ]
    assert len(files) == len(set(files)) >= 2
    assert sum(run(requests)) > 0
    assert (
        sqs.receive_message(QueueUrl=landing.queue_url, WaitTimeSeconds=0).get("Messages") is None
    )  # acknowledged

    # duplicate delivery of every event: new runs, nothing loaded twice
    for key in files:
        sqs.send_message(QueueUrl=landing.queue_url, MessageBody=json.dumps(_event(key.replace("/", "%2F"))))
    assert sum(run(tick())) == 0

    dead = drain_queue(sqs, landing.dead_letter_queue_url)
    reasons = " | ".join(m["MessageAttributes"]["cdc_reason"]["StringValue"] for m in dead)
    assert "notes.txt is neither a DMS full-load nor a CDC Parquet file name" in reasons
    assert f"table {env.schema}.unmapped is not in the mappings" in reasons

    loader = accounts_loader(local_stack, env, f"sensor_test_{mode}")
    assert_changelog_has_no_duplicates(loader)
    assert_current_state_equals_source(loader, env)


def test_a_tick_returns_as_soon_as_a_file_lands(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick long-polls the queue: a file landing a second into it is picked up at once, not at the next tick."""
    environment = local_stack.environment()
    for key, value in environment.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    landing = notified_landing(local_stack)
    sqs = landing.sqs()
    drain_queue(sqs, landing.queue_url)
    mapping = TableMapping(source="poll_db.events", target="poll.events", primary_key=["id"])
    cluster = ClusterMapping.model_validate(
        {
            "cluster": "poll",
            "connection": {"host_env": "H", "port_env": "P", "user_env": "U", "password_env": "W"},
            "tables": [mapping.model_dump()],
        }
    )
    sensor = build_sqs_sensor(Mappings(Path("."), (cluster,)), [bigquery_asset_key(mapping)], Settings.load())
    key = "cdc/poll_db/events/2026/11/30/20261130-1200000000.parquet"
    sender = threading.Timer(
        1.0, lambda: sqs.send_message(QueueUrl=landing.queue_url, MessageBody=json.dumps(_event(key)))
    )
    context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), resources={"landing": landing})
    started = time.monotonic()
    sender.start()
    result = sensor(context)
    took = time.monotonic() - started
    [request] = result.run_requests
    assert request.run_config["ops"][LOADER]["config"]["tables"]["poll.events"]["keys"] == [key]
    assert 0.9 <= took < 3.5, took  # returned with the file, before the 4 s long poll ran out
    for receipt in request.run_config["ops"][LOADER]["config"]["tables"]["poll.events"]["acknowledge"]:
        sqs.delete_message(QueueUrl=landing.queue_url, ReceiptHandle=receipt)


def test_a_run_keeps_its_messages_invisible_past_the_visibility_timeout(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that outlasts the queue's visibility timeout keeps its messages from coming back: renewed until it
    drops them (acknowledged or given back); a dropped one comes back after its timeout; a handle SQS refuses is
    dropped and the rest go on being renewed."""
    for key, value in local_stack.environment().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    sqs = notified_landing(local_stack).sqs()
    queue_url = sqs.create_queue(QueueName="keep-invisible-test", Attributes={"VisibilityTimeout": "2"})[
        "QueueUrl"
    ]
    drain_queue(sqs, queue_url)
    for n in range(12):
        sqs.send_message(QueueUrl=queue_url, MessageBody=f"file {n}")
    received: dict[str, str] = {}
    while len(received) < 12:
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
            received[message["Body"]] = message["ReceiptHandle"]
    warnings: list[str] = []

    def visible() -> list[str]:
        answer = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=30)
        return sorted(m["Body"] for m in answer.get("Messages", []))

    with KeptInvisible(sqs, queue_url, warnings.append, every=0.5, seconds=2) as invisible:
        invisible.keep(received.values())
        invisible.keep(["not-a-receipt-handle"])
        time.sleep(4.5)  # twice the queue's timeout
        assert visible() == []
        assert "not-a-receipt-handle" not in invisible.receipts  # refused: dropped, the others renewed
        invisible.drop([received["file 3"]])
        time.sleep(3.0)
        assert visible() == ["file 3"]  # back after its timeout, the others still kept
    assert warnings == []
    time.sleep(2.5)  # stopped: no more renewals
    assert len(visible()) + len(visible()) == 11
    sqs.delete_queue(QueueUrl=queue_url)
