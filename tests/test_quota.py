"""The load-job budget: no 24 hours ever start more load jobs than the cap; a hot table's files are held in the
sensor's cursor (messages kept invisible, not deleted) and go into its next load together."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cdc import settings
from cdc.mappings import ClusterMapping, Mappings, TableMapping
from cdc.settings import SettingError, Settings
from cdc_assets.quota import LoadBudget
from local_stack.stack import LocalStack
from sensors.sqs_sensor import QueuedFiles, apply_budget, hold
from tests.support.capture import drain_queue, landing_resource


def test_a_busy_table_never_exceeds_its_daily_cap() -> None:
    state: dict[str, Any] | None = None
    started = 0
    for second in range(0, 86_400, 5):  # a batch for the table every 5 s all day long
        budget = LoadBudget(state, 1_000_000.0 + second, table_cap=1_200, project_cap=90_000)
        started += budget.take("slots.bets")
        state = budget.state()
    assert 1_150 <= started <= 1_200  # the cap, nearly all of it used
    quiet = LoadBudget(state, 1_000_000.0 + 86_400, table_cap=1_200, project_cap=90_000)
    assert quiet.take("slots.rounds")  # another table has its own bucket


def test_the_project_cap_holds_across_tables() -> None:
    budget = LoadBudget(None, 0.0, table_cap=1_500, project_cap=100)  # burst: 5 project-wide
    assert sum(budget.take(f"t{i}") for i in range(50)) == 5
    assert budget.seconds_until_load("t0") > 0


def test_caps_outside_bigquerys_limits_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.MAX_LOAD_JOBS_PER_TABLE_PER_DAY, "2000")
    with pytest.raises(SettingError, match=r"CDC_MAX_LOAD_JOBS_PER_TABLE_PER_DAY=2000 is outside 1\.\.1500"):
        Settings.load()
    monkeypatch.setenv(settings.MAX_LOAD_JOBS_PER_TABLE_PER_DAY, "many")
    with pytest.raises(SettingError, match="not a whole number"):
        Settings.load()


def test_held_files_wait_invisible_and_join_the_next_load(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = local_stack.environment()
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(settings.MAX_LOAD_JOBS_PER_TABLE_PER_DAY, "40")  # burst 2, then one per ~38 min
    landing = landing_resource(local_stack, "cdc", queue_url=environ["CDC_SQS_QUEUE_URL"])
    sqs = landing.sqs()
    table = TableMapping(source="quota_db.hot", target="quota.hot", primary_key=["id"])
    cluster = ClusterMapping.model_validate(
        {
            "cluster": "quota_test",
            "connection": {"host_env": "H", "port_env": "P", "user_env": "U", "password_env": "W"},
            "tables": [table.model_dump()],
        }
    )
    mappings = Mappings(directory=local_stack.mappings.directory, clusters=(cluster,))

    drain_queue(sqs, landing.queue_url)  # S3 events of other tests' files: not this test's business

    def batch(n: int) -> QueuedFiles:
        sqs.send_message(QueueUrl=landing.queue_url, MessageBody=json.dumps({"n": n}))
        [message] = sqs.receive_message(QueueUrl=landing.queue_url, AttributeNames=["All"])["Messages"]
        assert message["Body"] == json.dumps({"n": n})
        return QueuedFiles(
            table,
            "2026-11-25",
            {f"cdc/quota_db/hot/f{n}.parquet"},
            {message["MessageId"]: message["ReceiptHandle"]},
            {message["MessageId"]: 1},
        )

    config = Settings.load()
    caps = (config.max_load_jobs_per_table_per_day, config.max_load_jobs_per_project_per_day)
    cursor: dict[str, Any] = {}
    now = 5_000_000.0
    loaded = []
    for n in range(3):
        ready, held, cursor = apply_budget([batch(n)], cursor, mappings, now, caps)
        loaded += ready
    assert [sorted(b.keys) for b in loaded] == [
        ["cdc/quota_db/hot/f0.parquet"],
        ["cdc/quota_db/hot/f1.parquet"],
    ]
    assert held and cursor["held"][0]["keys"] == ["cdc/quota_db/hot/f2.parquet"]
    hold(landing, held, cursor["next_load_in_s"]["quota.hot"])
    assert not sqs.receive_message(QueueUrl=landing.queue_url, WaitTimeSeconds=0).get("Messages")  # invisible

    later = now + cursor["next_load_in_s"]["quota.hot"] + 1
    ready, held, cursor = apply_budget([batch(3)], json.loads(json.dumps(cursor)), mappings, later, caps)
    assert not held and cursor["held"] == []
    [merged] = ready
    assert merged.keys == {"cdc/quota_db/hot/f2.parquet", "cdc/quota_db/hot/f3.parquet"}  # one load job
    assert len(merged.receipts) == 2  # and both messages are acknowledged by that load
    for receipt in [
        r for b in (*loaded, merged) for r in b.receipts.values()
    ]:  # acknowledged, as a load would
        sqs.delete_message(QueueUrl=landing.queue_url, ReceiptHandle=receipt)


def test_holding_files_whose_message_a_run_deleted_meanwhile_holds_the_rest_and_goes_on(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load run queued past the queue's visibility timeout: its messages came back, the sensor received them again
    for a table in flight and holds them, while the run loads the files and deletes the messages. SQS refuses the
    deleted one's handle; the tick must still hold the others and keep its cursor (it failed here, and the messages
    it had already hidden for minutes were in no cursor: a 6-minute delay in a bench run)."""
    environ = local_stack.environment()
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    landing = landing_resource(local_stack, "cdc", queue_url=environ["CDC_SQS_QUEUE_URL"])
    sqs = landing.sqs()
    drain_queue(sqs, landing.queue_url)
    table = TableMapping(source="quota_db.busy", target="quota.busy", primary_key=["id"])
    received = []
    for n in range(12):  # more than one batch call of ten
        sqs.send_message(QueueUrl=landing.queue_url, MessageBody=json.dumps({"n": n}))
    while len(received) < 12:
        received += sqs.receive_message(QueueUrl=landing.queue_url, MaxNumberOfMessages=10)["Messages"]
    deleted = received[0]
    sqs.delete_message(
        QueueUrl=landing.queue_url, ReceiptHandle=deleted["ReceiptHandle"]
    )  # the run's acknowledgement
    files = QueuedFiles(
        table,
        "2026-11-25",
        {f"cdc/quota_db/busy/f{n}.parquet" for n in range(12)},
        {m["MessageId"]: m["ReceiptHandle"] for m in received},
        {m["MessageId"]: 2 for m in received},
    )

    class Log:
        warnings: list[str] = []

        def warning(self, message: str) -> None:
            self.warnings.append(message)

    log = Log()
    hold(landing, [files], 0, log)  # the margin keeps them invisible for a minute
    assert len(log.warnings) == 1 and "1 held message(s) could not be kept invisible" in log.warnings[0]
    assert "ReceiptHandleIsInvalid" in log.warnings[0]
    assert not sqs.receive_message(QueueUrl=landing.queue_url, WaitTimeSeconds=0).get("Messages")  # all held
    for message in received[1:]:  # loaded by this test's imaginary run: not another test's business
        sqs.delete_message(QueueUrl=landing.queue_url, ReceiptHandle=message["ReceiptHandle"])
