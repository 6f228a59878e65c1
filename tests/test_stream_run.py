"""The standing stream run against moto and the BigQuery server: the SQS sensor orders landed files to it instead of
requesting load runs, it loads them and acknowledges their messages, yields a table to a later run (a backfill, the
next stream run) and takes it back once that run is done - one writer per table throughout."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import dagster as dg
import pytest

from cdc.mappings import Mappings
from cdc.settings import Settings
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.resources import AlertWebhookResource, BigQueryCdcResource
from cdc_assets.stream_run import build_stream_job, stream_run_config
from cdc_assets.writers import (
    HEARTBEAT_KEY,
    HEARTBEAT_STALE_S,
    RELEASED_TO,
    STREAM_JOB,
    earlier_holders,
    table_names,
)
from local_stack.stack import LocalStack
from sensors.receiver import stop_all as stop_receivers
from sensors.sqs_sensor import build_sqs_sensor
from sensors.stream_runs import build_stream_run_sensor, next_stream_run_due
from tests.support import waiting
from tests.support.accounts import (
    DDL,
    accounts_stream_loader,
    assert_changelog_has_no_duplicates,
    assert_current_state_equals_source,
    insert_accounts,
    stream_all,
)
from tests.support.capture import capture_changes, drain_queue, new_env, notified_landing, run_sql
from tests.support.runs import add_started_stream_run


def wait_for(what: str, condition: Callable[[], Any]) -> Any:
    return waiting.wait_for(condition, what, timeout=90, interval=0.2)


def _queued(sqs: Any, queue_url: str) -> int:
    """Messages in the queue, visible or taken and not deleted."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return sum(int(attributes[name]) for name in names)


def test_the_stream_run_loads_what_the_sensor_orders_and_yields_tables_to_later_runs(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    environment = local_stack.environment()
    for key, value in environment.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    landing = notified_landing(local_stack)
    sqs = landing.sqs()
    drain_queue(sqs, landing.queue_url)
    env = new_env(local_stack, "slots_accounts")
    env.prefix = local_stack.settings.prefix  # the notified landing prefix
    run_sql(env, DDL)
    insert_accounts(env, range(1, 5))
    mapping = env.table("accounts", ["id"], type_overrides={"vip": "BOOL"}).model_copy(
        update={"target": "stream_run_test.accounts", "load_mode": "streaming"}
    )
    cluster = env.mapping(mapping)
    capture_changes(env, cluster, "UPDATE `{schema}`.accounts SET n = 1 WHERE id = 1")
    mappings = Mappings(directory=env.stack.mappings.directory, clusters=(cluster,))
    settings = dataclasses.replace(Settings.load(), stream_run_minutes=3.0)
    asset = bigquery_asset_key(mapping)
    names = table_names([mapping])
    sensor = build_sqs_sensor(mappings, [asset], settings)
    job = build_stream_job(mappings, settings)
    keeper = build_stream_run_sensor(job, mappings, settings)
    resources = {
        "landing": landing,
        "bigquery": BigQueryCdcResource(
            project=local_stack.settings.bigquery_project,
            endpoint=local_stack.bigquery.endpoint,
            write_endpoint=local_stack.bigquery.write_endpoint,
        ),
        "alerts": AlertWebhookResource(),
    }
    loader = accounts_stream_loader(local_stack, env, "stream_run_test")

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:

        def tick() -> dg.SensorResult:
            result = sensor(
                dg.build_sensor_context(instance=instance, resources={"landing": landing}, cursor=cursor[0])
            )
            cursor[0] = result.cursor
            return result

        cursor: list[str | None] = [None]
        request = keeper(dg.build_sensor_context(instance=instance))
        assert isinstance(request, dg.RunRequest)  # none running: the keeper starts one
        assert request.run_config == stream_run_config([mapping.target], 3.0)
        outcome: dict[str, dg.ExecuteInProcessResult] = {}
        worker = threading.Thread(
            target=lambda: outcome.setdefault(
                "run",
                job.execute_in_process(run_config=request.run_config, instance=instance, resources=resources),
            ),
            daemon=True,
        )
        worker.start()
        [stream] = wait_for(
            "the stream run to start",
            lambda: instance.get_runs(
                dg.RunsFilter(job_name=STREAM_JOB, statuses=[dg.DagsterRunStatus.STARTED])
            ),
        )
        wait_for(
            "its heartbeat", lambda: instance.run_storage.get_cursor_values({HEARTBEAT_KEY + stream.run_id})
        )
        assert not next_stream_run_due(instance, time.time(), 3.0)  # it takes orders for minutes yet

        def loads() -> list[dg.EventLogEntry]:
            return instance.all_logs(stream.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)

        # the sensor orders the landed files to the stream run: no load run
        result = tick()
        assert not result.run_requests
        [first] = wait_for("the first load", loads)
        materialization = first.asset_materialization
        assert materialization is not None and materialization.asset_key == asset
        assert materialization.partition == dt.datetime.now(dt.UTC).date().isoformat()
        assert materialization.metadata["files"].value >= 2 and materialization.metadata["rows_U"].value == 1
        assert sqs.receive_message(QueueUrl=landing.queue_url, WaitTimeSeconds=0).get("Messages") is None
        assert_current_state_equals_source(loader, env)

        # a backfill of the table starts: the stream run releases the table to it, and its files wait in the
        # sensor's cursor until the backfill is done
        backfill = dg.DagsterRun(
            job_name="__ASSET_JOB",
            run_id="a-backfill",
            status=dg.DagsterRunStatus.STARTED,
            asset_selection={asset},
        )
        instance.add_run(backfill)
        backfill_record = instance.get_run_record_by_id(backfill.run_id)
        assert backfill_record is not None
        wait_for(
            "the release", lambda: not earlier_holders(instance, backfill_record, [asset], time.time(), names)
        )
        [released] = instance.all_logs(stream.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION)
        assert released.asset_observation is not None
        assert released.asset_observation.metadata[RELEASED_TO].value == backfill.run_id
        capture_changes(env, cluster, "DELETE FROM `{schema}`.accounts WHERE id = 4")
        stream_all(loader, env)  # the backfill loads it (its state document moves on)
        # the continuous receiver keeps the file of a table another run holds for the tick, which holds it
        held = wait_for("the file held", lambda: '"held"' in (tick().cursor or "") and cursor[0])
        assert "accounts" in held and not tick().run_requests
        time.sleep(1)
        assert len(loads()) == 1  # not loaded while the backfill holds the table
        instance.report_run_failed(instance.get_run_by_id(backfill.run_id))
        assert not tick().run_requests  # the held files, ordered to the stream run
        wait_for("the second load", lambda: len(loads()) == 2)
        second = loads()[1].asset_materialization
        assert second is not None
        # the run read the table's state again after the backfill: nothing to append, its stream where it was
        # (a state kept from before the release would meet the backfill's appends and resync)
        assert second.metadata["new_changes"].value == 0
        assert second.metadata["stream_resynced"].value is False
        assert_current_state_equals_source(loader, env)
        assert_changelog_has_no_duplicates(loader)

        # an order naming only a file the run's last load read (a message delivered twice) is acknowledged
        # without a load
        capture_changes(env, cluster, "UPDATE `{schema}`.accounts SET n = 3 WHERE id = 2")
        # ordered by the continuous receiver as it lands: no tick in between
        wait_for("the third load", lambda: len(loads()) == 3)
        listed = landing.s3().list_objects_v2(Bucket=landing.bucket, Prefix=f"{env.prefix}/")["Contents"]
        newest = max(listed, key=lambda o: (o["LastModified"], o["Key"]))["Key"]
        event = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": newest}}}]}
        sqs.send_message(QueueUrl=landing.queue_url, MessageBody=json.dumps(event))  # delivered again
        wait_for(
            "the message again", lambda: not tick().run_requests and _queued(sqs, landing.queue_url) == 0
        )
        time.sleep(1)
        assert len(loads()) == 3
        assert_current_state_equals_source(loader, env)

        # the next stream run has started: this one hands every table over and ends
        add_started_stream_run(instance, "the-next-stream-run", [mapping.target], 3.0)
        worker.join(timeout=60)
        assert not worker.is_alive() and outcome["run"].success
        ended = [
            e.user_message
            for e in instance.all_logs(stream.run_id)
            if e.user_message.startswith("stream run done")
        ]
        assert ended and "3 load(s) of 1 table(s), 0 failed" in ended[0], ended
        assert "1 order(s) of files read already acknowledged without a load" in ended[0], ended

        # the table switched to batch mode since the (next) stream run started (the code server loaded the new
        # mappings: this process's receiver is gone): its files go to a run of its own
        stop_receivers()
        batched = mapping.model_copy(update={"load_mode": "batch"})
        switched = build_sqs_sensor(
            Mappings(directory=env.stack.mappings.directory, clusters=(env.mapping(batched),)),
            [asset],
            settings,
        )
        capture_changes(env, cluster, "UPDATE `{schema}`.accounts SET n = 2 WHERE id = 1")

        def switched_tick() -> dg.SensorResult | None:
            result = switched(dg.build_sensor_context(instance=instance, resources={"landing": landing}))
            return result if result.run_requests else None

        result = wait_for("the batch-mode load run", switched_tick)
        assert [r.asset_selection for r in result.run_requests or []] == [[asset]]
        assert json.loads(result.cursor or "{}")["order_slot"] == 0  # no order sent

        # a stream run that stopped beating holds nothing: a later run need not wait for it
        instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", run_id="later", asset_selection={asset}))
        later = instance.get_run_record_by_id("later")
        assert later is not None
        assert earlier_holders(instance, later, [asset], time.time(), names) == {
            asset: ["the-next-stream-run"]
        }
        stale = repr(time.time() - HEARTBEAT_STALE_S - 1)
        instance.run_storage.set_cursor_values({HEARTBEAT_KEY + "the-next-stream-run": stale})
        assert not earlier_holders(instance, later, [asset], time.time(), names)


def test_a_stream_run_of_mappings_deployed_over_is_replaced_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream run loads by the mappings its process loaded: once others are deployed (here: a setting of the loads
    changed) the keeper requests the next one at once - it takes every table over and the old one ends - instead of
    after the old one's minutes."""
    from cdc.mappings import load_mappings
    from definitions import build_definitions
    from sensors.stream_runs import MAPPINGS_TAG, mappings_fingerprint

    defs = build_definitions()
    fingerprint = mappings_fingerprint(load_mappings(), Settings.load())
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(
            defs.resolve_job_def(STREAM_JOB),
            run_config=stream_run_config(["slots.bets"], 15.0),
            status=dg.DagsterRunStatus.STARTED,
            tags={MAPPINGS_TAG: fingerprint},
        )
        instance.run_storage.set_cursor_values({HEARTBEAT_KEY + run.run_id: repr(time.time())})
        keeper = defs.resolve_sensor_def("standing_stream_run")
        assert isinstance(keeper(dg.build_sensor_context(instance=instance)), dg.SkipReason)  # minutes to go
        monkeypatch.setenv("CDC_MAX_STALENESS_MINUTES", "3")
        deployed = build_definitions().resolve_sensor_def("standing_stream_run")
        request = deployed(dg.build_sensor_context(instance=instance))
        assert isinstance(request, dg.RunRequest) and request.tags[MAPPINGS_TAG] not in ("", fingerprint)
        assert next_stream_run_due(instance, time.time(), 15.0, "other mappings")
        assert not next_stream_run_due(instance, time.time(), 15.0, fingerprint)


def test_a_stream_run_starts_loads_on_idle_threads_only_the_longest_waiting_tables_first() -> None:
    """Loads start only on idle threads, the tables whose files were ordered first before the others, and a load takes
    its table's files when it starts: files ordered while the pool is busy join their table's next load instead of
    waiting behind a load queued before them."""
    from concurrent.futures import ThreadPoolExecutor

    from cdc.mappings import load_mappings
    from cdc_assets.load_run import LoadStepSettings
    from cdc_assets.stream_run import StreamRun, TableFiles

    tables = {t.target: t for _, t in load_mappings().tables()}
    a, b, c = sorted(tables)[:3]
    gate = threading.Event()
    started: list[tuple[str, list[str]]] = []

    class AllFree:
        def free(self, assets: Any) -> set[dg.AssetKey]:
            return set(assets)

    run = StreamRun.__new__(StreamRun)
    run.tables, run.pending, run.loading, run.read_keys, run.states = tables, {}, {}, {}, {}
    run.hand_over = AllFree()  # type: ignore[assignment]
    run.settings, run.workers = LoadStepSettings(2, 1500), 2

    def load_and_settle(load: Any, day: str) -> Any:
        started.append((load.files.target, sorted(load.files.keys)))
        gate.wait(10)
        return load.task

    run.load_and_settle = load_and_settle  # type: ignore[method-assign]

    def order(target: str, key: str, at: float) -> None:
        files = run.pending.setdefault((target, "2026-12-04"), TableFiles(target, "2026-12-04"))
        files.keys.add(key)
        files.ordered_at = min(files.ordered_at or at, at)

    order(a, "a1", 3.0)
    order(b, "b1", 1.0)
    order(c, "c1", 2.0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        run.start_loads(pool, set())
        waiting.wait_for(lambda: len(started) == 2, "two loads started", timeout=5, interval=0.05)
        assert {t for t, _ in started} == {b, c}  # the two longest waiting; a waits for an idle thread
        assert len(run.loading) == 2 and (a, "2026-12-04") in run.pending
        order(a, "a2", 4.0)  # lands while every thread is busy: joins a's load, which has not started
        order(b, "b2", 5.0)  # b is loading: its next load takes it
        run.start_loads(pool, set())
        assert len(run.loading) == 2
        gate.set()
        for future in list(run.loading):
            future.result(timeout=10)
            run.loading.pop(future)
        run.start_loads(pool, set())
        for future in list(run.loading):
            future.result(timeout=10)
    assert started[2:] == [(a, ["a1", "a2"]), (b, ["b2"])]


def test_a_stream_runs_inbox_reads_the_ring_only_when_the_head_moves(tmp_path: Any) -> None:
    """The run polls one key (the head: slot and id of the newest order) and reads only the slots written since the
    head it last found - the whole ring before it has found one; an order whose head is written before its slot (a
    storage that writes the two keys apart) is taken at the next poll, and orders for another run are left alone."""
    from cdc_assets.stream_run import (
        ORDER_HEAD_KEY,
        ORDER_KEY,
        ORDER_SLOTS,
        OrderInbox,
        TableFiles,
        send_order,
    )

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        storage = instance.run_storage
        reads: list[int] = []
        read = storage.get_cursor_values

        def counted(keys: set[str]) -> dict[str, str]:
            reads.append(len(keys))
            return read(keys)

        storage.get_cursor_values = counted  # type: ignore[method-assign]
        inbox = OrderInbox(instance, "mine")
        send_order(instance, "mine", 0, [TableFiles("game.bets", "2026-12-04", {"k1"}, {"r1"})])
        send_order(instance, "other", 1, [TableFiles("game.users", "2026-12-04", {"u1"}, {"s1"})])
        [taken] = inbox.take()
        assert (taken.target, taken.keys, taken.receipts) == ("game.bets", {"k1"}, {"r1"})
        assert reads == [1, ORDER_SLOTS]  # the head, then the whole ring: no head found yet
        reads.clear()
        assert inbox.take() == [] and inbox.take() == []
        assert reads == [1, 1]  # the head only: the ring is not read while the head stays

        # the head written first, its order's slot a moment later
        reads.clear()
        storage.set_cursor_values({ORDER_HEAD_KEY: "2:late"})
        assert inbox.take() == [] and reads == [1, 1]  # the one slot written since
        order = {"id": "late", "run": "mine", "sent": time.time(), "tables": [
            {"table": "game.bets", "day": "2026-12-04", "keys": ["k2"], "receipts": ["r2"]}
        ]}  # fmt: skip
        storage.set_cursor_values({f"{ORDER_KEY}2": json.dumps(order)})
        [late] = inbox.take()
        assert late.keys == {"k2"}
        reads.clear()
        assert inbox.take() == [] and reads == [1]

        # three orders between two polls: the three slots after the last head's, across the ring's end
        for slot in (3, 4, 5):
            send_order(instance, "mine", slot, [TableFiles("game.bets", "2026-12-04", {f"k{slot}"}, set())])
        reads.clear()
        assert sorted(k for f in inbox.take() for k in f.keys) == ["k3", "k4", "k5"] and reads == [1, 3]
        inbox._slot = ORDER_SLOTS - 2  # as if the last head found were near the ring's end
        send_order(instance, "mine", 0, [TableFiles("game.bets", "2026-12-04", {"k0"}, set())])
        reads.clear()
        assert [f.keys for f in inbox.take()] == [{"k0"}] and reads == [1, 2]
