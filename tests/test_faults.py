"""Faults injected into the live local platform under a running workload; afterwards BigQuery's current state must
equal the source row for row and the changelog hold no change twice. `make faults` runs these and prints the table
(fault, rows compared, missing, duplicated, time to recover, message shown); `make test` runs them too.

Each case runs the real background services (`cdc capture start`, `cdc dagster start`: daemon, sensor, runs) for
one table of its own, with S3 and SQS reached through a TCP proxy the test can cut. A fault returns the message the
user was shown (an alert on the webhook, the capture's status or log, a command's error); the case then checks the
data, and that no credential (MariaDB passwords, the AWS secret key, the webhook's token) was written to any log,
Dagster's storage (run config, event log, asset metadata) or the capture's status.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pymysql
import pytest

from cdc.clients import aws_client
from cdc_assets.stream_run import STREAM_RUN_TAG
from local_stack.stack import LocalStack
from sensors.sqs_sensor import LOAD_RUN_TAG
from tests.support.accounts import (
    DDL,
    account_row,
    accounts_loader,
    assert_current_state_equals_source,
    insert_accounts,
)
from tests.support.capture import (
    CaptureEnv,
    in_thread,
    landed_keys,
    new_env,
    run_sql,
    source_text_rows,
    write_mapping,
)
from tests.support.faults import TcpProxy, tcp_proxy
from tests.support.pipeline import RunningPipeline, running_pipeline, wait_until_equal
from tests.support.waiting import wait_for
from tests.support.webhook import Receiver

pytestmark = pytest.mark.faults

CLUSTER = "roulette_play"
WORKLOAD_SECONDS = 15.0  # the fault is injected 5 s in; long faults outlast it
MIN_TRANSACTIONS = (
    60  # the workload goes on until it has committed this many, so every fault meets real changes
)


@dataclass
class FaultRun:
    """What a fault may act on: the running pipeline, the test's table, the proxy in front of S3/SQS, the webhook."""

    pipeline: RunningPipeline
    env: CaptureEnv
    proxy: TcpProxy
    receiver: Receiver
    mappings: Path
    log_offset: int = 0  # the capture log is the session's: this case reads only what was written during it

    def __post_init__(self) -> None:
        self.log_offset = self._log_path().stat().st_size

    def _log_path(self) -> Path:
        return self.pipeline.stack.state_dir / "capture" / "capture.log"

    def capture_log(self) -> str:
        with self._log_path().open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")

    def capture_said(self, needle: str) -> str:
        """The capture's first log message containing `needle` (waited for)."""
        return "capture: " + wait_for(
            lambda: next(
                (line.split(" ERROR ", 1)[-1] for line in self.capture_log().splitlines() if needle in line),
                None,
            ),
            f"the capture to log {needle!r}",
        )

    def capture_status(self) -> dict[str, Any]:
        return dict(json.loads(self.pipeline.cdc("capture", "status", "--json"))[0])

    def alert_naming(self, *needles: str, timeout: float = 120) -> str:
        """The first alert line naming all `needles` (the Dagster instance and its sensors are shared by the
        session's tests: a line must name this test's table or file)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.receiver.texts().splitlines():
                if all(needle in line for needle in needles):
                    return line.lstrip("• ").strip()
            time.sleep(1)
        raise AssertionError(f"no alert naming {needles}; received:\n{self.receiver.texts()[-3000:]}")


# -- the workload ----------------------------------------------------------------------------------------------


@contextmanager
def workload(
    env: CaptureEnv, seconds: float, rate: float = 10.0, at_least: int = MIN_TRANSACTIONS
) -> Iterator[dict[str, int]]:
    """Transactions of 1-3 changes (inserts, updates, key changes, deletes) on the accounts table for `seconds` and
    until `at_least` committed (a loaded machine or a long fault slows it; at most 120 s more), in a thread; a lost
    connection (the server restarted) is reconnected and counted. Leaving the block waits for it."""
    done = {"transactions": 0, "interrupted": 0}

    def write() -> None:
        rng = random.Random(7)
        next_id = 100
        deadline, ceiling = time.monotonic() + seconds, time.monotonic() + seconds + 120
        connection = None
        while time.monotonic() < ceiling and (time.monotonic() < deadline or done["transactions"] < at_least):
            try:
                if connection is None:
                    connection = env.admin()
                with connection.cursor() as cursor:
                    cursor.execute("BEGIN")
                    for _ in range(rng.randint(1, 3)):
                        next_id = _one_change(cursor, env, rng, next_id)
                    cursor.execute("COMMIT")
                done["transactions"] += 1
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError):
                done["interrupted"] += 1  # the transaction may or may not have committed: the source decides
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.5)
            time.sleep(1 / rate)
        if connection is not None:
            connection.close()

    with in_thread(write, stop=lambda: None, join_timeout=seconds + 240):
        yield done


def _one_change(cursor: Any, env: CaptureEnv, rng: random.Random, next_id: int) -> int:
    cursor.execute(f"SELECT id FROM `{env.schema}`.accounts")
    ids = [int(r[0]) for r in cursor.fetchall()]
    choice = rng.random()
    if choice < 0.45 or not ids:
        next_id += 1
        cursor.execute(f"INSERT INTO `{env.schema}`.accounts VALUES {account_row(next_id)}")
    elif choice < 0.8:
        cursor.execute(
            f"UPDATE `{env.schema}`.accounts SET money = money + 1, n = n + 1 WHERE id = %s",
            (rng.choice(ids),),
        )
    elif choice < 0.9:
        next_id += 1
        cursor.execute(
            f"UPDATE `{env.schema}`.accounts SET id = %s WHERE id = %s", (next_id, rng.choice(ids))
        )
    else:
        cursor.execute(f"DELETE FROM `{env.schema}`.accounts WHERE id = %s", (rng.choice(ids),))
    return next_id


# -- the faults: each injects one, applies the remedy its message names (if any), returns that message -----------


def _kill_9(run: FaultRun, service: str) -> None:
    """SIGKILL a background service with all its processes (its process group), as a crash would."""
    import os

    pid = int((run.pipeline.stack.state_dir / service / f"{service}.pid").read_text().strip())
    os.killpg(pid, signal.SIGKILL)


def capture_killed_mid_transaction(run: FaultRun) -> str:
    """A 10,000-row transaction commits; the capture is killed -9 while it reads it, and restarted."""
    rows = (
        ", ".join(account_row(i) for i in range(1_000_000, 1_010_000)).replace("{", "{{").replace("}", "}}")
    )
    run_sql(run.env, f"INSERT INTO `{run.env.schema}`.accounts VALUES {rows}")
    time.sleep(0.7)
    _kill_9(run, "capture")
    time.sleep(5)
    run.pipeline.cdc("capture", "start", "--flush-interval", "0.5")
    return "none needed: the capture resumed at its checkpoint"


def _wait_for_a_load_in_progress(run: FaultRun, timeout: float = 60) -> None:
    """Return once one of the sensor's load runs, or a stream run, is in progress (the workload keeps the sensor
    busy)."""
    instance = dg.DagsterInstance.from_config(str(run.pipeline.stack.state_dir / "dagster" / "home"))
    deadline = time.monotonic() + timeout
    try:
        while not any(
            instance.get_run_records(
                dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags=tags), limit=1
            )
            for tags in ({LOAD_RUN_TAG: "sensor"}, {STREAM_RUN_TAG: "true"})
        ):
            assert time.monotonic() < deadline, f"no load run started in {timeout:.0f} s"
            time.sleep(0.2)
    finally:
        instance.dispose()


def dagster_killed_and_restarted(run: FaultRun) -> str:
    _wait_for_a_load_in_progress(run)
    _kill_9(run, "dagster")  # webserver, daemon and the runs in progress
    time.sleep(10)
    said = run.pipeline.cdc("dagster", "start", "--port", str(run.pipeline.port))
    orphaned = [line for line in said.splitlines() if "marked failed" in line or "left alone" in line]
    return (orphaned[0] if orphaned else "none needed") + "; unacknowledged files loaded again"


def bigquery_down_30_s(run: FaultRun) -> str:
    assert run.pipeline.stack.bigquery.stop()
    time.sleep(30)
    run.pipeline.stack.bigquery.start()
    return "none needed: the loads' BigQuery calls were retried until the server answered again"


def s3_and_sqs_unreachable_30_s(run: FaultRun) -> str:
    run.proxy.cut()
    time.sleep(30)
    run.proxy.restore()
    return run.capture_said("source or S3 unreachable")


def mariadb_restarted_under_load(run: FaultRun) -> str:
    server = run.pipeline.stack.mariadb(CLUSTER)
    assert server.stop()
    time.sleep(5)
    server.start()
    return run.capture_said("source or S3 unreachable")


def every_event_again_out_of_order(run: FaultRun) -> str:
    """S3 delivers at least once and in no order: every landed file's event arrives again, shuffled, three times
    during the load (older files after newer ones)."""
    sqs = aws_client("sqs", run.pipeline.stack.environment())
    queue = run.pipeline.stack.environment()["CDC_SQS_QUEUE_URL"]
    rng = random.Random(11)
    for _ in range(3):
        keys = sorted(landed_keys(run.env, "accounts"))
        rng.shuffle(keys)
        for key in keys:
            record = {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"object": {"key": key}},
            }
            sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Records": [record]}))
        time.sleep(5)
    return "none needed: redelivered files were recognised as loaded"


def poison_file_lands(run: FaultRun) -> str:
    """A file with a DMS name that is not Parquet lands among the table's files."""
    now = dt.datetime.now(dt.UTC)
    key = f"{run.env.prefix}/{run.env.schema}/accounts/{now:%Y/%m/%d}/{now:%Y%m%d-%H%M%S}9999.parquet"
    run.env.s3().put_object(Bucket=run.pipeline.stack.settings.bucket, Key=key, Body=b"not parquet")
    return run.alert_naming(key, "not a readable Parquet file")


def incompatible_type_change(run: FaultRun) -> str:
    """The source changes a column from INT to VARCHAR: the table stops with an alert naming the column; the
    remedy it names (drop both BigQuery tables, re-snapshot) is applied and the table resumes."""
    run_sql(run.env, "ALTER TABLE `{schema}`.accounts MODIFY n VARCHAR(20) NULL")
    message = run.alert_naming(run.env.schema, "incompatible type change", "column n")
    loader = accounts_loader(run.pipeline.stack, run.env, run.env.schema)
    for name in ("accounts", "accounts_changelog"):
        loader.bq.delete_table(f"{loader.project}.{run.env.schema}.{name}")
    run.pipeline.cdc("resnapshot", f"{run.env.schema}.accounts")
    return message


def binlog_purged_past_the_checkpoint(run: FaultRun) -> str:
    """The capture is stopped, the source writes on and purges its binlogs; the restarted capture must stop with
    the error and alert; the re-snapshot the message names restores equality."""
    run.pipeline.cdc("capture", "stop")
    time.sleep(3)  # the workload goes on: changes the stopped capture has not read
    with run.env.admin() as connection, connection.cursor() as cursor:
        cursor.execute("FLUSH BINARY LOGS")
        cursor.execute("SHOW MASTER STATUS")
        current = cursor.fetchone()[0]

        def purged() -> bool:  # MariaDB keeps a file until its binlog checkpoint has passed it: ask again
            cursor.execute(f"PURGE BINARY LOGS TO '{current}'")
            cursor.execute("SHOW BINARY LOGS")
            return [row[0] for row in cursor.fetchall()] == [current]

        wait_for(purged, "the binlogs to be purged", timeout=30)
    run.pipeline.cdc("capture", "start", "--flush-interval", "0.5")
    message = run.alert_naming(f"cluster {CLUSTER}", "it was purged")
    status = run.capture_status()
    assert status["state"] == "failed" and any("it was purged" in e for e in status["errors"]), status
    assert f"cdc resnapshot --cluster {CLUSTER}" in message
    # the reset alone restarts the stopped cluster in the running capture process (its other clusters go on)
    pid = status["pid"]
    run.pipeline.cdc("capture", "reset", "--cluster", CLUSTER)
    wait_for(lambda: run.capture_status().get("state") == "streaming", "the capture to stream again")
    assert run.capture_status()["pid"] == pid
    run.pipeline.cdc("resnapshot", "--cluster", CLUSTER)
    return message


HOSTILE_MAPPING = {
    "cluster": CLUSTER,
    "connection": {
        "host_env": "CDC_MYSQL_ROULETTE_PLAY_HOST",
        "port_env": "CDC_MYSQL_ROULETTE_PLAY_PORT",
        "user_env": "CDC_MYSQL_ROULETTE_PLAY_USER",
        "password_env": "CDC_MYSQL_ROULETTE_PLAY_PASSWORD",
    },
    "tables": [
        {"source": "games.bets`; DROP TABLE games.bets; --", "target": "games.bets", "primary_key": ["id"]},
        {"source": "games.rounds", "target": "games.rounds'; DELETE FROM x", "primary_key": ["id"]},
        {"source": "games.spins", "target": "games.spins"},
    ],
}


def bad_mapping_deployed(run: FaultRun) -> str:
    """A mapping file with hostile identifiers and a missing primary key is deployed to the running pipeline:
    validation refuses it naming file, table and field; nothing running changes."""
    path = run.mappings / f"{CLUSTER}.json"
    good = path.read_text()
    path.write_text(json.dumps(HOSTILE_MAPPING))
    try:
        result = run.pipeline.cdc_result("mappings", "deploy")
    finally:
        path.write_text(good)
    assert result.returncode == 1, result.stdout + result.stderr
    for expected in (
        f"{path.name}: tables[0] (games.bets`; DROP TABLE games.bets; --).source",
        f"{path.name}: tables[1] (games.rounds).target",
        f"{path.name}: tables[2] (games.spins): primary_key: required unless append_only is true",
        "Nothing was deployed",
    ):
        assert expected in result.stderr, result.stderr
    deployed = run.pipeline.stack.state_dir / "mappings" / f"{CLUSTER}.json"
    assert json.loads(deployed.read_text()) == json.loads(good)  # the running platform kept its mappings
    first = result.stderr.splitlines()[1].strip().replace(f"{run.mappings}/", "")
    return f"cdc mappings deploy refused (3 problems): {first}"


def table_missing_at_the_source(run: FaultRun) -> str:
    """A valid mapping adds a table that does not exist at the source: the capture names it and goes on."""
    path = run.mappings / f"{CLUSTER}.json"
    mapping = json.loads(path.read_text())
    mapping["tables"].append(
        {
            "source": f"{run.env.schema}.no_such_table",
            "target": f"{run.env.schema}.no_such_table",
            "primary_key": ["id"],
        }
    )
    path.write_text(json.dumps(mapping))
    deployed = run.pipeline.cdc("mappings", "deploy")
    assert f"added: {run.env.schema}.no_such_table" in deployed and "reloaded" in deployed, deployed
    return "capture: " + wait_for(
        lambda: next((e for e in run.capture_status().get("errors", []) if "no_such_table" in e), None),
        "the capture to name the missing table",
    )


FAULTS: dict[str, Callable[[FaultRun], str]] = {
    "capture killed -9 mid-transaction, restarted": capture_killed_mid_transaction,
    "Dagster killed -9 mid-load, restarted": dagster_killed_and_restarted,
    "BigQuery server down 30 s": bigquery_down_30_s,
    "S3 + SQS unreachable 30 s": s3_and_sqs_unreachable_30_s,
    "every S3 event again, out of order (x3)": every_event_again_out_of_order,
    "poison file in the landing prefix": poison_file_lands,
    "incompatible type change at the source": incompatible_type_change,
    "mapping with errors deployed": bad_mapping_deployed,
    "mapping names a table missing at the source": table_missing_at_the_source,
    "binlog purged past the capture's checkpoint": binlog_purged_past_the_checkpoint,
    "MariaDB restarted under load": mariadb_restarted_under_load,
}


# -- the case ----------------------------------------------------------------------------------------------------


def _setup(local_stack: LocalStack, tmp_path: Path) -> tuple[CaptureEnv, Path]:
    env = new_env(local_stack, CLUSTER)
    env.prefix = local_stack.settings.prefix  # the notified prefix
    run_sql(env, DDL)
    insert_accounts(env, range(1, 21))
    folder = tmp_path / "mappings"
    write_mapping(env, folder, CLUSTER, ["accounts"])
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


def assert_no_credential_written(stack: LocalStack, secrets_: dict[str, str]) -> None:
    """No secret in any log of the state folder, in Dagster's storage (run config, event log with asset metadata
    and check results, compute logs), or in the capture's status and checkpoint documents."""
    state = stack.state_dir
    places = [p for p in state.rglob("*.log") if p.is_file()]
    places += [p for p in (state / "dagster").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".db") for p in places), "Dagster's storage was not found"
    found = []
    for path in places:
        data = path.read_bytes()
        found += [f"{name} in {path}" for name, value in secrets_.items() if value.encode() in data]
    s3 = aws_client("s3", stack.environment())
    listing = []
    for control in ("_cdc_capture/", "_cdc_loader/"):  # the capture's and the streaming loader's documents
        listing += s3.list_objects_v2(Bucket=stack.settings.bucket, Prefix=control).get("Contents", [])
    for item in listing:
        body = s3.get_object(Bucket=stack.settings.bucket, Key=item["Key"])["Body"].read()
        found += [
            f"{name} in s3://{item['Key']}" for name, value in secrets_.items() if value.encode() in body
        ]
    assert not found, found


# streaming is the default load mode; the faults that touch the loader most also run in batch mode
BATCH_TOO = (
    "Dagster killed -9 mid-load, restarted",
    "every S3 event again, out of order (x3)",
    "BigQuery server down 30 s",
)
CASES = [(fault, "streaming") for fault in FAULTS] + [(fault, "batch") for fault in BATCH_TOO]


@pytest.mark.parametrize(("fault", "mode"), CASES, ids=[f"{f} [{m}]" for f, m in CASES])
def test_a_fault_under_load_loses_and_doubles_nothing(
    fault: str,
    mode: str,
    local_stack: LocalStack,
    tmp_path: Path,
    receiver: Receiver,
    fault_report: list[dict[str, Any]],
) -> None:
    env, folder = _setup(local_stack, tmp_path)
    token = secrets.token_urlsafe(16)
    aws_secret = secrets.token_urlsafe(24)  # moto accepts any key: a distinctive one to search for
    moto_port = local_stack.settings.moto_port
    with tcp_proxy(moto_port) as proxy:
        variables = {
            "CDC_ALERT_WEBHOOK_URL": f"{receiver.url}/{token}",
            "AWS_ENDPOINT_URL": proxy.url,
            "AWS_SECRET_ACCESS_KEY": aws_secret,
            "CDC_LOAD_MODE": mode,
        }
        with running_pipeline(local_stack, folder, variables) as pipeline:
            pipeline.env = env
            run = FaultRun(pipeline, env, proxy, receiver, folder)
            loader = accounts_loader(local_stack, env, env.schema)
            wait_until_equal(lambda: assert_current_state_equals_source(loader, env), pipeline)
            with workload(env, seconds=WORKLOAD_SECONDS) as written:
                time.sleep(5)
                injected = time.monotonic()
                message = FAULTS[fault](run)
                fault_seconds = time.monotonic() - injected
            back = time.monotonic()  # the fault is over and the workload has stopped: from here on, recovery
            wait_until_equal(lambda: assert_current_state_equals_source(loader, env), pipeline, 300)
            recovered = time.monotonic() - back
            outcome = _outcome(env, loader)
    fault_report.append(
        {
            "fault": fault + (" [batch]" if mode == "batch" else ""),
            **outcome,
            "transactions": written["transactions"],
            "fault_s": round(fault_seconds, 1),
            "recovered_s": round(recovered, 1),
            "message": message[:300],
        }
    )
    assert outcome["missing"] == 0 and outcome["duplicated"] == 0
    assert written["transactions"] >= MIN_TRANSACTIONS, written
    passwords = {
        f"{cluster} {kind} password": value
        for cluster, kinds in local_stack.settings.passwords.items()
        for kind, value in kinds.items()
    }
    assert_no_credential_written(
        local_stack, {**passwords, "AWS secret key": aws_secret, "webhook token": token}
    )
