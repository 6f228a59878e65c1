"""Faults injected into the live local platform under a running workload; afterwards BigQuery's current state must
equal the source row for row and the changelog hold no change twice. `make faults` runs these and prints the table
(fault, rows compared, missing, duplicated, time to recover, message shown); `make test` runs them too."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cdc.clients import aws_client
from local_stack.stack import LocalStack
from tests.capture_support import CaptureEnv, in_thread, landed_keys, new_env, run_sql, source_text_rows
from tests.conftest import Receiver
from tests.pipeline_support import RunningPipeline, running_pipeline, wait_until_equal
from tests.test_capture import _write_mapping
from tests.test_loader import (
    DDL,
    _loader,
    _row,
    assert_current_state_equals_source,
    insert_accounts,
)

pytestmark = pytest.mark.faults


@contextmanager
def workload(env: CaptureEnv, seconds: float, rate: float = 10.0) -> Iterator[dict[str, int]]:
    """Inserts, updates, key changes and deletes on the accounts table, one transaction each, in a thread that
    runs its full `seconds` (leaving the block waits for it)."""
    done = {"transactions": 0}

    def write() -> None:
        rng = random.Random(7)
        next_id = 100
        deadline = time.monotonic() + seconds
        with env.admin() as connection, connection.cursor() as cursor:
            while time.monotonic() < deadline:
                cursor.execute(f"SELECT id FROM `{env.schema}`.accounts")
                ids = [int(r[0]) for r in cursor.fetchall()]
                choice = rng.random()
                if choice < 0.45 or not ids:
                    next_id += 1
                    cursor.execute(f"INSERT INTO `{env.schema}`.accounts VALUES {_row(next_id)}")
                elif choice < 0.8:
                    cursor.execute(
                        f"UPDATE `{env.schema}`.accounts SET money = money + 1, n = n + 1 WHERE id = %s",
                        (rng.choice(ids),),
                    )
                elif choice < 0.9:
                    next_id += 1
                    cursor.execute(
                        f"UPDATE `{env.schema}`.accounts SET id = %s WHERE id = %s",
                        (next_id, rng.choice(ids)),
                    )
                else:
                    cursor.execute(f"DELETE FROM `{env.schema}`.accounts WHERE id = %s", (rng.choice(ids),))
                done["transactions"] += 1
                time.sleep(1 / rate)

    with in_thread(write, stop=lambda: None, join_timeout=seconds + 60):
        yield done


def _setup(local_stack: LocalStack, tmp_path: Path, cluster: str) -> tuple[CaptureEnv, Path]:
    env = new_env(local_stack, cluster)
    env.prefix = local_stack.settings.prefix  # the notified prefix
    run_sql(env, DDL)
    insert_accounts(env, range(1, 21))
    folder = tmp_path / "mappings"
    _write_mapping(env, folder, cluster, ["accounts"])
    return env, folder


def _outcome(env: CaptureEnv, loader: Any) -> dict[str, int]:
    """Rows compared, source rows missing from BigQuery, and changes the changelog holds twice."""
    expected, _ = source_text_rows(env, "accounts", ["id"])
    loaded = {str(int(r.id)) for r in loader.bq.query(f"SELECT id FROM {loader.ref('accounts')}").result()}
    counts = next(
        iter(
            loader.bq.query(
                f"SELECT COUNT(*) AS n, COUNT(DISTINCT CONCAT(_change_seq, _op)) AS d "
                f"FROM {loader.ref('accounts_changelog')}"
            ).result()
        )
    )
    return {
        "rows": len(expected),
        "missing": len({k[0] for k in expected} - loaded),
        "duplicated": int(counts.n) - int(counts.d),
    }


def _kill_9(pipeline: RunningPipeline, service: str) -> None:
    """SIGKILL a background service with all its processes (its process group), as a crash would."""
    pid = int((pipeline.stack.state_dir / service / f"{service}.pid").read_text().strip())
    os.killpg(pid, signal.SIGKILL)


def bigquery_down_60_s(pipeline: RunningPipeline) -> None:
    assert pipeline.stack.bigquery.stop()
    time.sleep(60)
    pipeline.stack.bigquery.start()


def capture_killed_and_restarted(pipeline: RunningPipeline) -> None:
    _kill_9(pipeline, "capture")
    time.sleep(10)
    pipeline.cdc("capture", "start", "--flush-interval", "0.5")


def dagster_killed_and_restarted(pipeline: RunningPipeline) -> None:
    time.sleep(2)  # a load is likely in flight: the workload keeps the sensor busy
    _kill_9(pipeline, "dagster")  # webserver, daemon and the runs in progress
    time.sleep(10)
    pipeline.cdc("dagster", "start", "--port", str(pipeline.port))


def every_event_again_out_of_order(pipeline: RunningPipeline) -> None:
    """S3 delivers at least once and in no order: every landed file's event arrives again, shuffled, three times
    during the load (older files after newer ones)."""
    sqs = aws_client("sqs", pipeline.stack.environment())
    queue = pipeline.stack.environment()["CDC_SQS_QUEUE_URL"]
    env = pipeline.env
    rng = random.Random(11)
    for _ in range(3):
        keys = sorted(landed_keys(env, "accounts"))
        rng.shuffle(keys)
        for key in keys:
            record = {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"object": {"key": key}},
            }
            sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": [record]}))
        time.sleep(5)


FAULTS: dict[str, Callable[[RunningPipeline], None]] = {
    "BigQuery server down 60 s": bigquery_down_60_s,
    "capture killed -9 under load, restarted": capture_killed_and_restarted,
    "Dagster killed -9 mid-load, restarted": dagster_killed_and_restarted,
    "every S3 event again, out of order (x3)": every_event_again_out_of_order,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_under_load_loses_and_doubles_nothing(
    fault: str,
    local_stack: LocalStack,
    tmp_path: Path,
    receiver: Receiver,
    fault_report: list[dict[str, Any]],
) -> None:
    env, folder = _setup(local_stack, tmp_path, "roulette_play")
    with running_pipeline(local_stack, folder, {"CDC_ALERT_WEBHOOK_URL": receiver.url}) as pipeline:
        pipeline.env = env
        loader = _loader(local_stack, env, env.schema)
        wait_until_equal(lambda: assert_current_state_equals_source(loader, env), pipeline)
        with workload(env, seconds=30) as written:
            time.sleep(5)
            FAULTS[fault](pipeline)
        back = time.monotonic()  # the fault is over and the workload has stopped: from here on, recovery
        wait_until_equal(lambda: assert_current_state_equals_source(loader, env), pipeline, 300)
        recovered = time.monotonic() - back
        outcome = _outcome(env, loader)
    # the alert's line naming this test's table and the error (other tests' runs share the Dagster instance)
    alerts = [line for line in receiver.texts().splitlines() if env.schema in line and ":" in line]
    message = alerts[-1].lstrip("• ") if alerts else "(no alert: the pipeline recovered by itself)"
    fault_report.append(
        {
            "fault": fault,
            **outcome,
            "transactions": written["transactions"],
            "recovered_s": round(recovered, 1),
            "message": message[:160],
        }
    )
    assert outcome["missing"] == 0 and outcome["duplicated"] == 0 and written["transactions"] > 100
