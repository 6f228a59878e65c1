"""The local platform, brought up by the real `cdc stack up`: every server answers and is wired as production is."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote_plus

import pymysql
import pytest

from cdc.clients import aws_client, bigquery_client
from cdc.mappings import load_mappings
from cdc.settings import MAPPINGS_DIR, STATE_DIR
from local_stack.processes import ServerProcess, free_port
from local_stack.stack import LocalStack
from tests.support.capture import drain_queue
from tests.support.commands import run_cdc


def stack_env(stack: LocalStack) -> dict[str, str]:
    """What a user gets from `eval "$(cdc stack env)"`, read back through a real shell."""
    cdc = Path(sys.executable).with_name("cdc")
    script = f'eval "$({cdc} stack env)" && env -0'
    output = subprocess.run(
        ["bash", "-c", script],
        env={STATE_DIR: str(stack.state_dir), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(item.split("=", 1) for item in output.split("\0") if "=" in item)


def test_status_reports_every_service_healthy(local_stack: LocalStack) -> None:
    result = run_cdc("stack", "status", env={STATE_DIR: str(local_stack.state_dir)})
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 + 2  # one MariaDB per mapped cluster, moto, BigQuery
    assert all("healthy" in line for line in lines), result.stdout
    for cluster in load_mappings().clusters:
        assert any(f"mariadb[{cluster.cluster}]" in line for line in lines)


def test_each_cluster_has_its_own_mariadb_with_the_binlog_the_capture_needs(local_stack: LocalStack) -> None:
    env = stack_env(local_stack)
    server_ids = set()
    for cluster in load_mappings().clusters:
        c = cluster.connection
        connection = pymysql.connect(
            host=env[c.host_env],
            port=int(env[c.port_env]),
            user=env[c.user_env],
            password=env[c.password_env],
        )
        with connection, connection.cursor() as cursor:
            cursor.execute(
                "SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata, @@gtid_strict_mode, "
                "@@character_set_server, @@time_zone, @@server_id"
            )
            log_bin, fmt, image, metadata, strict, charset, tz, server_id = cursor.fetchone()
            assert (log_bin, fmt, image, metadata, strict, charset, tz) == (
                1,
                "ROW",
                "FULL",
                "FULL",
                1,
                "utf8mb4",
                "+00:00",
            )
            server_ids.add(server_id)
            cursor.execute("SHOW GRANTS")
            grants = " ".join(row[0] for row in cursor.fetchall())
            # MariaDB 10.11 reports REPLICATION CLIENT under its new name, BINLOG MONITOR.
            for privilege in ("SELECT", "REPLICATION SLAVE", "BINLOG MONITOR"):
                assert privilege in grants
            assert "INSERT" not in grants and "ALL PRIVILEGES" not in grants  # capture reads, never writes
            cursor.execute("SHOW BINARY LOGS")
            assert cursor.fetchall()
    assert len(server_ids) == 6  # distinct servers, distinct binlogs


@pytest.fixture
def env(local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The stack's configuration, exported into this process as `eval "$(cdc stack env)"` would."""
    values = stack_env(local_stack)
    for key, value in values.items():
        if key.startswith(("CDC_", "AWS_")):
            monkeypatch.setenv(key, value)
    return values


def test_landing_objects_notify_the_queue_and_others_do_not(env: dict[str, str]) -> None:
    s3 = aws_client("s3")
    sqs = aws_client("sqs")
    queue = env["CDC_SQS_QUEUE_URL"]
    bucket = env["CDC_LANDING_BUCKET"]
    drain_queue(sqs, queue)
    landing_key = f"{env['CDC_LANDING_PREFIX']}/slots_play/bets/20261125-120000000.parquet"
    s3.put_object(Bucket=bucket, Key=landing_key, Body=b"x")
    s3.put_object(Bucket=bucket, Key="elsewhere/file.parquet", Body=b"x")
    keys = [
        unquote_plus(record["s3"]["object"]["key"])
        for message in _receive(sqs, queue, wait_for=1, delete=True)
        for record in json.loads(message["Body"]).get("Records", [])
    ]
    assert keys == [landing_key]


def test_a_message_received_too_often_moves_to_the_dead_letter_queue(
    local_stack: LocalStack, env: dict[str, str]
) -> None:
    sqs = aws_client("sqs")
    queue, dlq = env["CDC_SQS_QUEUE_URL"], env["CDC_SQS_DLQ_URL"]
    drain_queue(sqs, queue)
    drain_queue(sqs, dlq)
    sqs.send_message(QueueUrl=queue, MessageBody="poison")
    max_receives = local_stack.settings.max_receive_count
    for _ in range(max_receives):
        [message] = _receive(sqs, queue, wait_for=1)
        sqs.change_message_visibility(
            QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
        )
    assert _receive(sqs, queue, wait_for=0) == []
    assert [m["Body"] for m in _receive(sqs, dlq, wait_for=1, delete=True)] == ["poison"]


def test_bigquery_server_is_reachable_from_the_environment(local_stack: LocalStack) -> None:
    env = stack_env(local_stack)
    bq = bigquery_client(env["CDC_BIGQUERY_PROJECT"], endpoint=env["CDC_BIGQUERY_ENDPOINT"])
    assert [tuple(row.values()) for row in bq.query("SELECT 1 + 1 AS two").result()] == [(2,)]


def test_env_can_redact_secrets_for_display(local_stack: LocalStack) -> None:
    shown = run_cdc("stack", "env", "--redact", env={STATE_DIR: str(local_stack.state_dir)}).stdout
    for password in (p for pair in local_stack.settings.passwords.values() for p in pair.values()):
        assert password not in shown
    assert "CDC_MYSQL_SLOTS_PLAY_PASSWORD=***" in shown


def test_up_is_idempotent(local_stack: LocalStack) -> None:
    pids_before = _pids(local_stack)
    result = run_cdc("stack", "up", env={STATE_DIR: str(local_stack.state_dir)})
    assert result.stdout.count("healthy") == 8
    assert _pids(local_stack) == pids_before  # nothing restarted
    assert LocalStack(load_mappings(), local_stack.state_dir).settings == local_stack.settings


def test_lifecycle_with_another_mappings_folder_and_a_taken_port(tmp_path: Path) -> None:
    """CDC_MAPPINGS_DIR decides which clusters get a server; a taken port is named; down stops everything."""
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    document = json.loads(
        (Path(__file__).resolve().parent.parent / "mappings" / "poker_play.json").read_text()
    )
    (mappings / "poker_play.json").write_text(json.dumps(document))
    env = {STATE_DIR: str(tmp_path / "state"), MAPPINGS_DIR: str(mappings)}
    try:
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            taken = blocker.getsockname()[1]
            failed = run_cdc("stack", "up", "--free-ports", "--moto-port", str(taken), env=env, check=False)
            assert failed.returncode == 1
            assert f"moto (S3+SQS): port {taken} on 127.0.0.1 is already in use" in failed.stderr
        run_cdc("stack", "up", "--free-ports", env=env)
        status = run_cdc("stack", "status", env=env)
        assert status.stdout.count("mariadb[") == 1 and "mariadb[poker_play]" in status.stdout

        # moto keeps nothing across a restart (landed files, capture checkpoints): BigQuery's local tables, loaded
        # from those files, are dropped with them, so the capture's new full loads rebuild them exactly
        stack = LocalStack(load_mappings(mappings), tmp_path / "state")
        bq = bigquery_client(stack.settings.bigquery_project, endpoint=stack.bigquery.endpoint)
        bq.create_dataset("loaded_before_restart")
        run_cdc("stack", "down", env=env)
        run_cdc("stack", "up", env=env)
        assert [d.dataset_id for d in bq.list_datasets()] == []
    finally:
        down = run_cdc(
            "stack", "down", env=env
        )  # also when an assertion above failed: leave no servers behind
    assert "mariadb[poker_play]" in down.stdout and "moto" in down.stdout and "bigquery" in down.stdout
    stopped = run_cdc("stack", "status", env=env, check=False)
    assert stopped.returncode == 1 and stopped.stdout.count("stopped") == 3


def test_a_server_that_cannot_start_is_named_with_its_log(tmp_path: Path) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    document = json.loads(
        (Path(__file__).resolve().parent.parent / "mappings" / "poker_play.json").read_text()
    )
    (mappings / "poker_play.json").write_text(json.dumps(document))
    state = tmp_path / "state"
    datadir = state / "mariadb" / "poker_play" / "data" / "mysql"
    datadir.mkdir(parents=True)  # looks initialised but is not: mariadbd cannot start
    env = {STATE_DIR: str(state), MAPPINGS_DIR: str(mappings)}
    result = run_cdc("stack", "up", "--free-ports", env=env, check=False)
    run_cdc("stack", "down", env=env)
    assert result.returncode == 1
    assert "mariadb[poker_play]" in result.stderr and "mariadbd.log" in result.stderr


def _pids(stack: LocalStack) -> list[int | None]:
    servers = [stack.mariadb(c).process for c in stack.clusters()] + [
        stack.moto.process,
        stack.bigquery.process,
    ]
    return [server.pid() for server in servers]


def _receive(sqs: object, queue: str, wait_for: int, delete: bool = False) -> list[dict[str, str]]:
    """Receive what arrives within `wait_for` s; with `delete`, the messages are consumed (otherwise they return to
    the session-shared queue after the visibility timeout, in the middle of another test)."""
    deadline = time.monotonic() + wait_for
    messages: list[dict[str, str]] = []
    while True:
        batch = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0)  # type: ignore[attr-defined]
        messages += [m for m in batch.get("Messages", []) if "s3:TestEvent" not in m["Body"]]
        if messages or time.monotonic() >= deadline:
            for message in batch.get("Messages", []) if delete else []:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])  # type: ignore[attr-defined]
            return messages
        time.sleep(0.1)


def test_moto_runs_with_a_clock_that_gives_moto_s_own_values(local_stack: LocalStack) -> None:
    """The local SQS stays fast as the queue fills (local_stack/moto_server.py): the launcher runs, and its clock
    gives the values moto's would, for now and for a given time."""
    import datetime as dt

    from moto.core import utils

    from local_stack import moto_server

    pid = local_stack.moto.process.pid()
    assert pid is not None
    assert "local_stack.moto_server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")
    when = dt.datetime(2026, 11, 25, 12, 30, 15, 250_000)
    assert moto_server.unix_time_millis(when) == utils.unix_time_millis(when)
    assert abs(moto_server.unix_time_millis() - utils.unix_time_millis()) < 50
    # and its queues work as SQS's: a message sent is received once, then is invisible until it times out
    sqs = aws_client("sqs", local_stack.environment())
    queue = sqs.create_queue(QueueName="clock-check", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody="m")
    assert len(sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1).get("Messages", [])) == 1
    assert sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages") is None
    time.sleep(1.5)
    assert len(sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1).get("Messages", [])) == 1
    sqs.delete_queue(QueueUrl=queue)


def test_moto_queue_attributes_are_computed_when_read_with_moto_s_own_values() -> None:
    """The launcher's queue attributes (local_stack/moto_server.py) hold the keys and values moto's own property
    gives, for a queue with messages, a redrive policy and settings; `get_queue_attributes` answers a plain dict."""
    import json

    import boto3
    from moto import mock_aws
    from moto.sqs import models

    from local_stack import moto_server

    stock = models.Queue.attributes
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        url = sqs.create_queue(
            QueueName="events",
            Attributes={
                "VisibilityTimeout": "30",
                "MessageRetentionPeriod": "3600",
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
            },
        )["QueueUrl"]
        for n in range(12):
            sqs.send_message(QueueUrl=url, MessageBody=str(n))
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=5)
        queue = models.sqs_backends["123456789012"]["us-east-1"].get_queue("events")
        expected = stock.fget(queue)
        try:
            moto_server.patch_queue_attributes()
            lazy = queue.attributes
            assert isinstance(lazy, moto_server.LazyQueueAttributes)
            assert dict(lazy) == expected
            assert (
                lazy["ApproximateNumberOfMessages"] == 7
                and lazy["ApproximateNumberOfMessagesNotVisible"] == 5
            )
            assert lazy.get("ContentBasedDeduplication") is None  # a standard queue has none, as in moto
            answer = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
            assert answer["ApproximateNumberOfMessages"] == "7" and "RedrivePolicy" in answer
            assert len(sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]) == 7
        finally:
            models.Queue.attributes = stock
            models.SQSBackend.get_queue_attributes = models.SQSBackend.get_queue_attributes.__wrapped__


def test_moto_lists_its_modules_once_with_moto_s_own_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's dispatcher lists its package folder for every request (under a global lock); the launcher's list is
    made once and holds the same names in the same order."""
    from moto import backends

    from local_stack import moto_server

    stock = list(backends.list_of_moto_modules())
    monkeypatch.setattr(backends, "list_of_moto_modules", backends.list_of_moto_modules)
    moto_server.patch_module_list()
    listed: list[str] = []
    monkeypatch.setattr(os, "listdir", lambda path: listed.append(path) or [])  # a listing would show here
    assert list(backends.list_of_moto_modules()) == stock and "s3" in stock and "sqs" in stock
    assert not listed


def test_a_server_started_by_a_process_ignoring_sigterm_still_stops_at_once(tmp_path: Path) -> None:
    """Ignored signals are inherited across exec: a service started from a process ignoring SIGTERM (a test session
    did) ignored every stop and was only killed at the stop's deadline (a minute per Dagster stop). Services start
    with the stop signals' default actions. The starter is a process of its own: ignoring SIGTERM in the test's
    process, even for a moment, hands that to whatever another thread of it starts meanwhile (Dagster's compute-log
    `tail` processes then outlived their run, and its end waited a minute for them)."""
    server = ServerProcess("sleeper", free_port(), tmp_path / "sleeper.pid", tmp_path / "sleeper.log")
    starter = (
        "import signal, sys; from pathlib import Path; from local_stack.processes import ServerProcess; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"server = ServerProcess('sleeper', {server.port}, Path({str(server.pid_file)!r}), "
        f"Path({str(server.log_file)!r})); "
        "server.start([sys.executable, '-c', 'import time; time.sleep(120)'], ready=lambda: True)"
    )
    subprocess.run([sys.executable, "-c", starter], check=True, timeout=60)
    pid = server.pid()
    assert pid is not None
    ignored = int(
        next(
            line
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("SigIgn:")
        ).split()[1],
        16,
    )
    assert not ignored & (1 << (signal.SIGTERM - 1))
    started = time.monotonic()
    assert server.stop(timeout=30)
    assert time.monotonic() - started < 10 and server.pid() is None


def test_the_bigquery_servers_duckdb_memory_is_bounded_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """DuckDB's default limit is 80 % of the machine's memory, which its buffer pool filled under the benchmark;
    the launcher bounds it (CDC_STACK_BIGQUERY_MEMORY) and names a malformed value."""
    import duckdb
    from bqemulator.storage.engine import DuckDBEngine

    from local_stack import bigquery_emulator

    monkeypatch.setattr(DuckDBEngine, "_apply_session_pragmas", DuckDBEngine._apply_session_pragmas)
    bigquery_emulator.patch_memory_limit()

    def limit_after_start() -> str:
        engine = object.__new__(DuckDBEngine)
        engine._connection = duckdb.connect()
        engine._apply_session_pragmas()
        (setting,) = engine._connection.execute("SELECT current_setting('memory_limit')").fetchone()  # type: ignore[misc]
        return str(setting)

    monkeypatch.delenv(bigquery_emulator.MEMORY_ENV, raising=False)
    assert limit_after_start() == "488.2 MiB"  # 512 MB
    monkeypatch.setenv(bigquery_emulator.MEMORY_ENV, "2GB")
    assert limit_after_start() == "1.8 GiB"
    monkeypatch.setenv(bigquery_emulator.MEMORY_ENV, "lots")
    with pytest.raises(SystemExit, match="CDC_STACK_BIGQUERY_MEMORY='lots'"):
        limit_after_start()


def test_row_counts_after_write_api_appends_show_at_once_and_survive_a_restart(tmp_path: Path) -> None:
    """The local server keeps a table's row count in memory at each Write API append and writes it to its catalog
    later (`bigquery_cdc.RowCounts`): tables.get shows it at once, and a server stopped right after the appends
    still has it when started again on the same data."""
    import pyarrow as pa
    from google.cloud import bigquery
    from google.cloud.bigquery_storage_v1 import types

    from cdc.clients import bigquery_write_client
    from cdc_assets.proto_rows import ProtoRows
    from local_stack.bigquery_emulator import BigQueryEmulatorServer

    server = BigQueryEmulatorServer(rest_port=free_port(), grpc_port=free_port(), project="p", root=tmp_path)
    server.start()
    try:
        bq = bigquery_client("p", endpoint=server.endpoint)
        write = bigquery_write_client(server.write_endpoint)
        bq.create_dataset("d")
        schema = [bigquery.SchemaField("id", "INTEGER"), bigquery.SchemaField("v", "STRING")]
        keyed = bigquery.Table("p.d.keyed", schema=schema)
        keyed.table_constraints = bigquery.table.TableConstraints(
            primary_key=bigquery.table.PrimaryKey(columns=["id"]), foreign_keys=None
        )
        bq.create_table(keyed)
        bq.create_table(bigquery.Table("p.d.plain", schema=schema))

        def append(table: str, request: types.AppendRowsRequest) -> None:
            request.write_stream = f"projects/p/datasets/d/tables/{table}/streams/_default"
            for response in write.append_rows(iter([request])):
                assert not response.error.code, response.error.message

        proto = ProtoRows(schema)
        upserts = pa.table({"id": [1, 2, 3], "v": ["a", "b", "c"]})
        for rows, kinds, sequences in (
            (upserts, ["UPSERT"] * 3, ["1", "2", "3"]),
            (upserts.slice(1, 1), ["DELETE"], ["4"]),
        ):
            request = types.AppendRowsRequest()
            request.proto_rows = types.AppendRowsRequest.ProtoData(
                writer_schema=types.ProtoSchema(proto_descriptor=proto.descriptor),
                rows=types.ProtoRows(serialized_rows=proto.encode(rows, kinds, sequences)),
            )
            append("keyed", request)
        plain = pa.table({"id": pa.array([1, 2, 3, 4], pa.int64()), "v": ["w", "x", "y", "z"]})
        request = types.AppendRowsRequest()
        request.arrow_rows = types.AppendRowsRequest.ArrowData(
            writer_schema=types.ArrowSchema(serialized_schema=plain.schema.serialize().to_pybytes()),
            rows=types.ArrowRecordBatch(
                serialized_record_batch=plain.to_batches()[0].serialize().to_pybytes()
            ),
        )
        append("plain", request)

        assert (bq.get_table("p.d.keyed").num_rows, bq.get_table("p.d.plain").num_rows) == (2, 4)
        server.stop()
        server.start()
        assert (bq.get_table("p.d.keyed").num_rows, bq.get_table("p.d.plain").num_rows) == (2, 4)
    finally:
        server.stop()


S3_LISTING_SCRIPT = """
import json, sys
import boto3
from moto import mock_aws
from local_stack import moto_server
if sys.argv[1] == "patched":
    moto_server.patch_s3_listing()
answers = []
with mock_aws():
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="landing")
    s3.create_bucket(Bucket="versioned")
    s3.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})

    def listings(bucket):
        for options in ({"Prefix": "cdc/a/"}, {"Prefix": "cdc/a/t1/", "StartAfter": "cdc/a/t1/0003.parquet"},
                        {"Prefix": "cdc/", "Delimiter": "/"}, {"Prefix": "cdc/a", "MaxKeys": 3},
                        {"Prefix": "cdc/b/"}, {"Prefix": "zzz"}, {}):
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, **options)
            answers.append([[(o["Key"], o["Size"]) for o in p.get("Contents", [])] +
                            [c["Prefix"] for c in p.get("CommonPrefixes", [])] for p in pages])
        answers.append(s3.list_objects(Bucket=bucket, Prefix="cdc/a/t2/").get("Contents", [])[0]["Key"])

    for bucket in ("landing", "versioned"):
        for n in range(8):
            for table in ("cdc/a/t1/", "cdc/a/t2/", "cdc/b/t1/", "cdc/ab/"):
                s3.put_object(Bucket=bucket, Key=f"{table}{n:04d}.parquet", Body=b"x" * n)
        listings(bucket)  # the index is built here
        s3.put_object(Bucket=bucket, Key="cdc/a/t1/0002.parquet", Body=b"again")  # written again
        s3.put_object(Bucket=bucket, Key="cdc/a/t1/0009.parquet", Body=b"new")  # new, after the index
        s3.put_object(Bucket=bucket, Key="cdc/a/t0/0001.parquet", Body=b"new")
        s3.delete_object(Bucket=bucket, Key="cdc/a/t2/0000.parquet")
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "cdc/a/t1/0005.parquet"}]})
        listings(bucket)
    from moto.s3.models import s3_backends
    stores = [s3_backends["123456789012"]["aws"].buckets[b].keys for b in ("landing", "versioned")]
    indexed = [s.__dict__.get("_names") == sorted(dict.keys(s)) for s in stores]
print(json.dumps({"answers": answers, "indexed": indexed}, default=str))
"""


def test_moto_lists_a_prefix_as_moto_does_from_its_sorted_key_names() -> None:
    """The launcher's S3 listing (local_stack/moto_server.py) answers every listing as stock moto does - prefixes,
    StartAfter, delimiters, pages, list v1 - after keys are written, written again, added and deleted (plain and
    versioned buckets)."""
    answers = {}
    for mode in ("stock", "patched"):
        done = subprocess.run(
            [sys.executable, "-c", S3_LISTING_SCRIPT, mode],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        answers[mode] = json.loads(done.stdout)
    assert answers["patched"]["answers"] == answers["stock"]["answers"]
    assert any("cdc/a/t1/0009.parquet" in str(answer) for answer in answers["patched"]["answers"])
    # the patched listings walked the sorted names, kept equal to the bucket's keys through every change
    assert answers["patched"]["indexed"] == [True, True] and answers["stock"]["indexed"] == [False, False]


def test_a_server_that_ignores_its_stop_is_killed_and_the_stop_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kill at the stop's deadline is not a clean stop (no last flush or checkpoint): it is said, with the log."""
    server = ServerProcess("stubborn", free_port(), tmp_path / "stubborn.pid", tmp_path / "stubborn.log")
    server.start(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)",
        ],
        ready=lambda: True,
    )
    time.sleep(0.5)  # its handler installed
    assert server.stop(timeout=1) and server.pid() is None
    said = capsys.readouterr().err
    assert (
        "stubborn (pid " in said
        and f"did not stop within 1 s of SIGTERM: killed; its log: {server.log_file}" in said
    )


def test_a_stop_leaves_nothing_of_the_servers_process_group(tmp_path: Path) -> None:
    """What a server starts stops with it: a child that ignores SIGTERM (as multiprocessing's resource tracker,
    beside Dagster's fork server, does) is waited for, then killed; the stop returns with the group empty."""
    server = ServerProcess("parent", free_port(), tmp_path / "parent.pid", tmp_path / "parent.log")
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    server.start(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)",
        ],
        ready=lambda: True,
    )
    pid = server.pid()
    assert pid is not None
    time.sleep(1.0)  # the child started, its handler installed
    assert server.stop(timeout=5)
    assert running_in_group(pid) == []


def running_in_group(pgid: int) -> list[int]:
    """The processes of the group that run (not zombies: those wait for whoever reaps them), from /proc."""
    from local_stack.processes import _stat

    running = []
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        try:
            state, group = _stat(pid)
        except OSError:
            continue
        if group == pgid and state != "Z":
            running.append(pid)
    return running


def test_a_zombie_does_not_keep_a_stop_waiting() -> None:
    """A process that has exited and is not reaped yet (a zombie) does not run: a stop does not wait for its parent
    (or, once that has gone, the init process) to reap it - `cdc stack down` took 5 s more per server that left one."""
    from local_stack.processes import _alive, _stat

    exited = subprocess.Popen(["true"], start_new_session=True)  # a group of its own; not reaped until wait()
    running = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while _stat(exited.pid)[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        os.killpg(exited.pid, 0)  # the group is still there, only the zombie in it
        assert not _alive(exited.pid) and not _alive(exited.pid, group=True)
        assert _alive(running.pid) and _alive(running.pid, group=True)
    finally:
        running.kill()
        running.wait()
        exited.wait()


def test_a_dagster_run_in_a_test_started_in_the_background_leaves_sigterm_to_what_the_test_starts(
    tmp_path: Path,
) -> None:
    """A test session started from a background job ignores SIGINT; after a Dagster execution on the main thread,
    Dagster sets SIGTERM to SIGINT's handler, so everything started afterwards ignored SIGTERM (a stream run's
    compute-log `tail` processes outlived it, and its end waited a minute). The suite's conftest gives the test
    processes SIGINT's default action first. Run as such a session: a pytest process started with SIGINT ignored."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import signal, subprocess\n"
        "import dagster as dg\n\n"
        "def test_probe():\n"
        "    @dg.op\n"
        "    def noop() -> None: ...\n\n"
        "    @dg.job\n"
        "    def job() -> None:\n"
        "        noop()\n\n"
        "    assert job.execute_in_process().success\n"
        "    child = subprocess.Popen(['sleep', '30'])\n"
        "    try:\n"
        "        status = open(f'/proc/{child.pid}/status').read()\n"
        "        ignored = int(next(l for l in status.splitlines() if l.startswith('SigIgn:')).split()[1], 16)\n"
        "        assert not ignored & (1 << (signal.SIGTERM - 1)), 'a process started after a Dagster run ignores SIGTERM'\n"
        "    finally:\n"
        "        child.kill()\n"
        "        child.wait()\n"
    )
    conftest = ("-p", "tests.conftest")  # the suite's conftest, as the suite's tests load it
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            *("-p", "no:cacheprovider", "-p", "no:bqemulator"),
            *conftest,
            str(probe),
        ],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert result.returncode == 0, result.stdout[-2000:]
