"""The capture against real MariaDB servers: Parquet read back from S3 equals the source value for value."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pymysql
import pytest
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import WriteRowsEvent

from capture import table_map_cache
from capture.columns import ColumnSpec, agrees_with_table_map
from capture.service import ClusterCapture
from capture.source_tables import SourceTable, read_columns
from cdc.landing import CHANGE_SEQUENCE_COLUMN, COMMIT_TIMESTAMP_COLUMN, NotALandingFile, parse_key
from cdc.mappings import ClusterMapping
from cdc.settings import SettingError, Settings
from cdc.source import cluster_connection
from local_stack.stack import LocalStack
from tests.support.capture import (
    FAST,
    CaptureEnv,
    capture_changes,
    compare_with_source,
    landed_rows,
    new_env,
    run_sql,
    running,
    wait_caught_up,
    write_mapping,
)
from tests.support.every_type import EDGE_ROWS, capture_every_type, create_every_type, insert_every_type


def test_full_load_and_cdc_of_every_type_equal_the_source(local_stack: LocalStack) -> None:
    env = new_env(local_stack, "slots_accounts")
    capture_every_type(env)
    assert compare_with_source(env, "every_type", ["id"]) == 5  # 1, 3, 101, 103 and 1000 (was 102)

    rows = landed_rows(env, "every_type")
    files = {row["_key"] for row in rows}
    assert any(key.endswith("/LOAD00000001.parquet") for key in files)
    cdc_files = [k for k in files if "LOAD" not in k]
    assert cdc_files and all(parse_key(k, env.prefix).kind == "cdc" for k in cdc_files)
    # the primary-key change is a delete of the old key and an insert of the new one, in that order
    pk_change = sorted(
        (r for r in rows if r["id"] in (102, 1000) and r["Op"] in "DI" and "LOAD" not in r["_key"]),
        key=lambda r: r[CHANGE_SEQUENCE_COLUMN],
    )
    assert [(r["Op"], r["id"]) for r in pk_change][-2:] == [("D", 102), ("I", 1000)]
    # the file schema comes from the column definitions, with the mapping's override applied
    body = env.s3().get_object(Bucket=env.stack.settings.bucket, Key=sorted(files)[0])["Body"].read()
    schema = pq.read_schema(io.BytesIO(body))
    assert [schema.field(i).name for i in (0, 1)] == ["Op", "cdc_commit_timestamp"]
    assert schema.names[-1] == "cdc_change_seq"
    assert str(schema.field("u64").type) == "uint64" and str(schema.field("flag").type) == "int8"
    assert str(schema.field("flag_bool").type) == "bool" and str(schema.field("b1").type) == "bool"
    assert (
        str(schema.field("b12").type) == "binary" and str(schema.field("wide").type) == "decimal256(65, 10)"
    )
    assert (
        str(schema.field("ts6").type) == "timestamp[us, tz=UTC]"
        and str(schema.field("dt6").type) == "timestamp[us]"
    )
    assert str(schema.field("t6").type) == "string" and str(schema.field("opts").type) == "string"
    sequences = [r[CHANGE_SEQUENCE_COLUMN] for r in rows if "LOAD" not in r["_key"]]
    assert all(len(s) == 35 and s.isdigit() for s in sequences) and len(set(sequences)) == len(sequences)


# Characters of many scripts: each character set stores what it can represent ('?' for the rest, as MySQL does).
CHARSET_SAMPLE = "AZaz09 ~\\'\" ÀÉÎõüßÿ €ƒ‰ŠŒŽ ĀĒąęłńśĞŞİ ΑΒΓαβγ АБВабвЁё אבג ابت กขค ԱԲԳ ႠႡ ÅÄÖ 日本語 中文 한국어 ｱｲｳ ½¼ 🎰"


def test_every_character_set_is_decoded_exactly_from_the_binlog(local_stack: LocalStack) -> None:
    """A column in each character set the server offers holds a sample of many scripts and (single-byte sets) every
    byte 0x80-0xFF; through the full load, the binlog (inserts and an update) the landed text equals the source's."""
    env = new_env(local_stack, "slots_accounts")
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT CHARACTER_SET_NAME, MAXLEN FROM information_schema.CHARACTER_SETS ORDER BY 1")
        charsets = [(str(name), int(maxlen)) for name, maxlen in cursor.fetchall() if name != "binary"]
    assert {"utf16", "utf16le", "ucs2", "utf32", "latin1", "swe7", "ujis", "sjis"} <= {n for n, _ in charsets}
    columns = ", ".join(f"c_{name} TEXT CHARACTER SET {name} NULL" for name, _ in charsets)
    run_sql(
        env,
        f"CREATE TABLE `{{schema}}`.charsets (id INT NOT NULL PRIMARY KEY, {columns}) DEFAULT CHARSET=utf8mb4",
    )

    def insert(first_id: int) -> None:
        sample = ", ".join(f"CONVERT(%(sample)s USING {name})" for name, _ in charsets)
        high = ", ".join(
            f"CAST(%(high)s AS CHAR CHARACTER SET {name})" if maxlen == 1 and name != "ascii" else "NULL"
            for name, maxlen in charsets
        )
        with env.admin() as connection, connection.cursor() as cursor:
            cursor.execute("SET SESSION sql_mode = ''")
            cursor.execute(
                f"INSERT INTO `{env.schema}`.charsets VALUES ({first_id}, {sample}), ({first_id + 1}, {high})",
                {"sample": CHARSET_SAMPLE, "high": bytes(range(0x80, 0x100))},
            )

    insert(1)  # through the full load
    table = env.table("charsets", ["id"])
    with running(ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)):
        wait_caught_up(env)
        insert(101)  # the same values through the binlog
        # an update's before and after images (a key change, so both stay in the landed state's history)
        run_sql(env, "UPDATE `{schema}`.charsets SET id = 103 WHERE id = 1")
        wait_caught_up(env)
    assert compare_with_source(env, "charsets", ["id"]) == 4
    with env.admin() as connection, connection.cursor() as cursor:  # the values exercise what they should
        cursor.execute(f"SELECT c_utf16, c_ucs2, c_utf32 FROM `{env.schema}`.charsets WHERE id = 101")
        assert cursor.fetchone() == (CHARSET_SAMPLE, CHARSET_SAMPLE.replace("🎰", "?"), CHARSET_SAMPLE)
        cursor.execute(f"SELECT c_latin1 FROM `{env.schema}`.charsets WHERE id = 102")
        assert cursor.fetchone()[0][:2] == "€\x81"  # a byte cp1252 leaves undefined: MySQL's latin1 has it


def test_a_stopped_capture_says_stopped_even_when_the_way_out_fails(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last status a capture writes is `stopped`: its first write failing in S3 is retried, and an error on the
    way out (here the last flush) is recorded in it instead of leaving the status `streaming` for good."""
    from botocore.exceptions import ClientError

    env = new_env(local_stack, "slots_play")
    run_sql(env, "CREATE TABLE `{schema}`.st (id INT PRIMARY KEY)", "INSERT INTO `{schema}`.st VALUES (1)")
    store = env.store()
    refused: list[str] = []
    write_json = store.write_json

    def flaky_write(kind: str, cluster: str, document: dict[str, Any]) -> None:
        if document.get("state") == "stopped" and not refused:
            refused.append(kind)
            raise ClientError(
                {"Error": {"Code": "SlowDown", "Message": "reduce your request rate"}}, "PutObject"
            )
        write_json(kind, cluster, document)

    monkeypatch.setattr(store, "write_json", flaky_write)
    capture = ClusterCapture(env.mapping(env.table("st", ["id"])), env.replication(), store, FAST)
    flush = capture._flush

    def failing_last_flush(force: bool = False, at_boundary: bool = True) -> None:
        if force and capture.stop_requested.is_set():
            raise RuntimeError("the last flush failed")
        flush(force, at_boundary)

    monkeypatch.setattr(capture, "_flush", failing_last_flush)
    with running(capture):
        wait_caught_up(env)
        run_sql(env, "INSERT INTO `{schema}`.st VALUES (2)")
        wait_caught_up(env)
    status = env.store().read_json("status", "slots_play")
    assert refused == ["status"]
    assert status is not None and status["state"] == "stopped"
    assert any("while stopping: RuntimeError: the last flush failed" in e for e in status["errors"])


def test_zero_dates_are_counted_in_the_status(local_stack: LocalStack) -> None:
    env = new_env(local_stack, "slots_accounts")
    create_every_type(env)
    insert_every_type(env, EDGE_ROWS[:1])  # full load: 2 zero DATE/DATETIME + 1 partial zero
    table = env.table("every_type", ["id"])
    capture = ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)
    with running(capture):
        wait_caught_up(env)
        insert_every_type(env, EDGE_ROWS[:1], offset=10)
        wait_caught_up(env)
    status = env.store().read_json("status", "slots_accounts")
    assert status is not None and status["zero_dates"] == 6 and status["state"] == "stopped"
    assert status["rows"] == {"load": 1, "I": 1}


def test_invalid_dates_under_allow_invalid_dates_become_null_and_are_counted(local_stack: LocalStack) -> None:
    """`2026-02-30` stored under ALLOW_INVALID_DATES is no date: NULL in the landed file, counted with the zero
    dates, whether it arrives through the full load or the binlog."""
    env = new_env(local_stack, "slots_accounts")
    run_sql(env, "CREATE TABLE `{schema}`.odd (id INT PRIMARY KEY, d DATE NULL, dt DATETIME(3) NULL)")

    def insert(first: int) -> None:
        with env.admin() as connection, connection.cursor() as cursor:
            cursor.execute("SET SESSION sql_mode = 'ALLOW_INVALID_DATES'")
            cursor.execute(
                f"INSERT INTO `{env.schema}`.odd VALUES ({first}, '2026-02-30', '2026-04-31 10:00:00.5'), "
                f"({first + 1}, '2026-02-28', '2026-04-30 10:00:00.5')"
            )

    insert(1)  # through the full load
    capture = ClusterCapture(env.mapping(env.table("odd", ["id"])), env.replication(), env.store(), FAST)
    with running(capture):
        wait_caught_up(env)
        insert(11)  # through the binlog
        wait_caught_up(env)
    rows = {row["id"]: row for row in landed_rows(env, "odd")}
    for invalid in (1, 11):
        assert rows[invalid]["d"] is None and rows[invalid]["dt"] is None, rows[invalid]
    for valid in (2, 12):
        assert (
            str(rows[valid]["d"]) == "2026-02-28" and str(rows[valid]["dt"]) == "2026-04-30 10:00:00.500000"
        )
    status = env.store().read_json("status", "slots_accounts")
    assert status is not None and status["zero_dates"] == 4


def test_a_100k_row_transaction_arrives_whole_and_ordered(local_stack: LocalStack) -> None:
    env = new_env(local_stack, "poker_play")
    run_sql(env, "CREATE TABLE `{schema}`.big (id INT PRIMARY KEY, v VARCHAR(20), amount DECIMAL(12,2))")
    capture = ClusterCapture(env.mapping(env.table("big", ["id"])), env.replication(), env.store(), FAST)
    with running(capture):
        wait_caught_up(env)
        run_sql(
            env,
            "BEGIN",
            "INSERT INTO `{schema}`.big SELECT seq, CONCAT('row', seq), seq / 100 FROM `{schema}`.seq_1_to_100000",
            "COMMIT",
        )
        wait_caught_up(env, timeout=180)
    rows = landed_rows(env, "big")
    assert len(rows) == 100_000 and {r["Op"] for r in rows} == {"I"}
    assert len({r[COMMIT_TIMESTAMP_COLUMN] for r in rows}) == 1  # one transaction, one commit time
    ordered = sorted(rows, key=lambda r: r[CHANGE_SEQUENCE_COLUMN])
    assert [r["id"] for r in ordered] == list(range(1, 100_001))
    assert compare_with_source(env, "big", ["id"]) == 100_000


def test_buffers_flush_by_binlog_bytes_before_the_interval(local_stack: LocalStack) -> None:
    """Wide rows flush when their binlog bytes reach flush_bytes, long before the flush interval or row limit:
    the capture's memory is bounded by bytes, not only rows."""
    env = new_env(local_stack, "roulette_play")
    run_sql(env, "CREATE TABLE `{schema}`.wide (id INT PRIMARY KEY, note VARCHAR(300))")
    settings = dataclasses.replace(FAST, flush_interval_s=120, flush_bytes=50_000)
    capture = ClusterCapture(env.mapping(env.table("wide", ["id"])), env.replication(), env.store(), settings)
    with running(capture):
        wait_caught_up(env)  # the full load of the empty table
        for batch in range(20):  # 20 transactions of 100 rows of ~250 bytes: ~25 KB of binlog each
            run_sql(
                env,
                f"INSERT INTO `{{schema}}`.wide SELECT seq + {batch * 100}, REPEAT(CHAR(65 + {batch}), 250) "
                "FROM `{schema}`.seq_1_to_100",
            )
        deadline = time.monotonic() + 30
        while len({row["_key"] for row in landed_rows(env, "wide")}) < 8:  # ~500 KB / 50 KB per flush
            assert time.monotonic() < deadline, "the capture did not flush by bytes"
            time.sleep(0.5)
    assert compare_with_source(env, "wide", ["id"]) == 2_000  # what was left is flushed at stop


def test_the_stream_reads_on_while_a_flush_uploads_and_checkpoints_only_after_it(
    local_stack: LocalStack,
) -> None:
    """A flush's S3 PUTs run off the decoding thread: while they hang, the capture goes on reading the binlog, and
    its checkpoint does not move past what is in S3 until they are done."""
    env = new_env(local_stack, "poker_play")
    run_sql(env, "CREATE TABLE `{schema}`.slow (id INT PRIMARY KEY, v INT)")
    store = env.store()
    uploads_may_go = threading.Event()
    uploads_may_go.set()
    put_file = store.put_file

    def held_put_file(key: str, body: bytes) -> None:
        assert uploads_may_go.wait(60), "the test never let the upload go"
        put_file(key, body)

    store.put_file = held_put_file  # type: ignore[method-assign]
    capture = ClusterCapture(env.mapping(env.table("slow", ["id"])), env.replication(), store, FAST)
    with running(capture):
        caught_up = wait_caught_up(env)["gtid"]  # the full load of the empty table
        uploads_may_go.clear()
        run_sql(env, "INSERT INTO `{schema}`.slow SELECT seq, seq FROM `{schema}`.seq_1_to_100")
        time.sleep(2 * FAST.flush_interval_s + 1)  # its flush is due and hangs in its PUT
        run_sql(env, "INSERT INTO `{schema}`.slow SELECT seq, seq FROM `{schema}`.seq_101_to_200")
        deadline = time.monotonic() + 30
        while capture.stats.rows["I"] < 200:  # inserts
            assert time.monotonic() < deadline, (
                f"the stream stopped at {capture.stats.rows} while a flush uploads"
            )
            time.sleep(0.1)
        assert capture.checkpoint["gtid"] == caught_up
        assert landed_rows(env, "slow") == []
        uploads_may_go.set()
        wait_caught_up(env)
    assert compare_with_source(env, "slow", ["id"]) == 200


def test_alter_table_mid_stream_keeps_columns_right(local_stack: LocalStack) -> None:
    env = new_env(local_stack, "poker_play")
    run_sql(env, "CREATE TABLE `{schema}`.evolving (id INT PRIMARY KEY, a VARCHAR(10), b INT)")
    run_sql(env, "INSERT INTO `{schema}`.evolving VALUES (1, 'one', 10)")
    capture = ClusterCapture(env.mapping(env.table("evolving", ["id"])), env.replication(), env.store(), FAST)
    with running(capture):
        wait_caught_up(env)
        run_sql(
            env,
            "INSERT INTO `{schema}`.evolving VALUES (2, 'two', 20)",
            "ALTER TABLE `{schema}`.evolving ADD COLUMN c DECIMAL(5,2) NULL AFTER a",
            "INSERT INTO `{schema}`.evolving VALUES (3, 'three', 3.5, 30)",
            "ALTER TABLE `{schema}`.evolving DROP COLUMN b",
            "INSERT INTO `{schema}`.evolving VALUES (4, 'four', 4.25)",
            "ALTER TABLE `{schema}`.evolving RENAME COLUMN a TO label",
            "UPDATE `{schema}`.evolving SET label = 'ONE' WHERE id = 1",
            "ALTER TABLE `{schema}`.evolving ADD COLUMN first_col INT NULL FIRST",
            "INSERT INTO `{schema}`.evolving VALUES (99, 5, 'five', 5.5)",
            # touch every row so each one's latest change has the final shape (a rename is a new column name
            # for the rows changed after it; rows not changed since keep the name they were written with)
            "UPDATE `{schema}`.evolving SET first_col = COALESCE(first_col, 0) + 1",
        )
        wait_caught_up(env)
    changes = sorted(
        (r for r in landed_rows(env, "evolving") if "LOAD" not in r["_key"]),
        key=lambda r: r["cdc_change_seq"],
    )
    rows = {}
    for change in changes:
        rows.setdefault(change["id"], change)  # each row's first change after the load
    assert rows[2]["a"] == "two" and rows[2]["b"] == 20 and "c" not in rows[2]
    assert rows[3]["a"] == "three" and str(rows[3]["c"]) == "3.50" and rows[3]["b"] == 30
    assert rows[4]["a"] == "four" and "b" not in rows[4]
    assert rows[1]["label"] == "ONE" and "a" not in rows[1]
    assert rows[5]["first_col"] == 99 and rows[5]["label"] == "five"
    assert compare_with_source(env, "evolving", ["id"]) == 5


@pytest.mark.parametrize("capture_during_alter", [False, True], ids=["capture-behind", "capture-following"])
def test_rows_logged_before_and_after_a_type_change_keep_their_own_types(
    local_stack: LocalStack, capture_during_alter: bool
) -> None:
    """Rows logged before an ALTER ... MODIFY are decoded by the binlog's own column types, not today's
    information_schema (the capture behind: here stopped while the statements run), and rows after it by the new
    types - also where only metadata changes (DECIMAL scale, TIME fractions, BINARY width, signedness)."""
    env = new_env(local_stack, "poker_play")
    run_sql(
        env,
        "CREATE TABLE `{schema}`.retyped (id INT PRIMARY KEY, n INT, u INT, d DECIMAL(5,2), t TIME, "
        "b BINARY(2), e ENUM('x','y'))",
        "CREATE TABLE `{schema}`.unmapped (id INT PRIMARY KEY)",
    )
    table = env.table("retyped", ["id"])
    statements = (
        "INSERT INTO `{schema}`.retyped VALUES (1, -5, -7, 123.45, '-01:02:03', 'a', 'y')",
        "ALTER TABLE `{schema}`.unmapped ADD COLUMN x INT",  # another table's DDL changes nothing here
        "INSERT INTO `{schema}`.retyped VALUES (3, 3, 3, 3, '03:00:00', 'c', 'x')",
        # only metadata changes: the type codes stay (a DECIMAL, TIME, BINARY, INT, ENUM each)
        "ALTER TABLE `{schema}`.retyped MODIFY u INT UNSIGNED, MODIFY d DECIMAL(9,4), MODIFY t TIME(3), "
        "MODIFY b BINARY(4), MODIFY e ENUM('w','x','y')",
        "INSERT INTO `{schema}`.retyped VALUES (2, 8, 7, 1.2345, '01:02:03.5', 'b', 'w')",
        "ALTER TABLE `{schema}`.retyped MODIFY n VARCHAR(20)",
        "INSERT INTO `{schema}`.retyped VALUES (4, 'text', 4, 4, '04:00:00', 'd', 'w')",
    )
    if capture_during_alter:
        capture_changes(env, env.mapping(table), *statements)
    else:
        with running(ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)):
            wait_caught_up(env)
        run_sql(env, *statements)
        capture = ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)
        with running(capture):
            wait_caught_up(env)
        assert not capture.status_document().get("errors"), capture.status_document()
    changes = {r["id"]: r for r in landed_rows(env, "retyped") if "LOAD" not in r["_key"]}
    columns = ["n", "u", "d", "t", "b", "e"]
    before, after = ([changes[i][c] for c in columns] for i in (1, 2))
    assert before == [-5, -7, Decimal("123.45"), "-01:02:03", b"a\x00", "y"]
    assert after == [8, 7, Decimal("1.2345"), "01:02:03.500", b"b\x00\x00\x00", "w"]
    assert (changes[3]["n"], changes[4]["n"], sorted(changes)) == (3, "text", [1, 2, 3, 4])


def test_replayed_changes_carry_identical_sequences(local_stack: LocalStack) -> None:
    env = new_env(local_stack, "roulette_play")
    run_sql(env, "CREATE TABLE `{schema}`.t (id INT PRIMARY KEY, v INT)")
    table = env.table("t", ["id"])
    capture = ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)
    with running(capture):
        first = wait_caught_up(env)
        run_sql(env, *[f"INSERT INTO `{{schema}}`.t VALUES ({i}, {i})" for i in range(50)])
        run_sql(env, "UPDATE `{schema}`.t SET v = v + 1", "DELETE FROM `{schema}`.t WHERE id < 10")
        wait_caught_up(env)
    before = landed_rows(env, "t")
    # rewind the checkpoint to before those changes and run again: every change is written a second time
    env.store().write_json("checkpoints", "roulette_play", first)
    with running(ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)):
        wait_caught_up(env)
    after = landed_rows(env, "t")
    cdc_before = [r for r in before if "LOAD" not in r["_key"]]
    replayed = [r for r in after if "LOAD" not in r["_key"] and r["_key"] not in {b["_key"] for b in before}]
    strip = lambda r: {k: v for k, v in r.items() if k != "_key"}  # noqa: E731
    assert len(replayed) == len(cdc_before) == 50 + 50 + 10
    assert sorted(map(str, map(strip, replayed))) == sorted(map(str, map(strip, cdc_before)))
    assert compare_with_source(env, "t", ["id"]) == 40


def test_a_table_added_to_the_mapping_file_is_captured_without_restart(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    env = new_env(local_stack, "roulette_accounts")
    run_sql(
        env,
        "CREATE TABLE `{schema}`.first (id INT PRIMARY KEY, v INT)",
        "CREATE TABLE `{schema}`.later (id INT PRIMARY KEY, v INT)",
    )
    run_sql(env, "INSERT INTO `{schema}`.later VALUES (1, 1), (2, 2)")  # exists before it is mapped
    folder = tmp_path / "mappings"
    write_mapping(env, folder, "roulette_accounts", ["first"])
    capture = ClusterCapture(
        env.mapping(env.table("first", ["id"])), env.replication(), env.store(), FAST, folder
    )
    with running(capture):
        wait_caught_up(env)
        run_sql(
            env,
            "INSERT INTO `{schema}`.first VALUES (1, 1)",
            "UPDATE `{schema}`.later SET v = 20 WHERE id = 2",
        )
        wait_caught_up(env)
        assert landed_rows(env, "later") == []  # not mapped yet: ignored
        write_mapping(env, folder, "roulette_accounts", ["first", "later"])  # an analyst adds the table
        deadline = time.monotonic() + 30
        while not landed_rows(env, "later") and time.monotonic() < deadline:
            time.sleep(0.2)
        run_sql(
            env, "INSERT INTO `{schema}`.later VALUES (3, 3)", "DELETE FROM `{schema}`.later WHERE id = 1"
        )
        wait_caught_up(env)
    assert compare_with_source(env, "later", ["id"]) == 2
    assert compare_with_source(env, "first", ["id"]) == 1
    assert any("LOAD" in row["_key"] for row in landed_rows(env, "later"))  # it got its own full load


def _capture_process(env: CaptureEnv, mappings_dir: Path, clusters: list[str]) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        **env.stack.environment(),
        "CDC_LANDING_PREFIX": env.prefix,
        "CDC_MAPPINGS_DIR": str(mappings_dir),
    }
    argv = [str(Path(sys.executable).with_name("cdc")), "capture", "run", "--flush-interval", "0.3"]
    for cluster in clusters:
        argv += ["--cluster", cluster]
    return subprocess.Popen(argv, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_9_during_a_busy_stream_loses_nothing(local_stack: LocalStack, tmp_path: Path) -> None:
    env = new_env(local_stack, "slots_play")
    run_sql(env, "CREATE TABLE `{schema}`.busy (id INT PRIMARY KEY, v BIGINT, note VARCHAR(40))")
    write_mapping(env, tmp_path / "mappings", "slots_play", ["busy"])
    process = _capture_process(env, tmp_path / "mappings", ["slots_play"])
    try:
        wait_caught_up(env)
        writer = subprocess.Popen(
            [
                "bash",
                "-c",
                # a busy stream: many small transactions, inserts, updates and deletes, for ~6 s
                f"for i in $(seq 1 600); do echo \"INSERT INTO {env.schema}.busy VALUES ($i, $i, 'n$i') "
                f"ON DUPLICATE KEY UPDATE v = v + 1; UPDATE {env.schema}.busy SET v = v * 2 WHERE id = $((i / 2)); "
                f'DELETE FROM {env.schema}.busy WHERE id = $((i / 3)) AND $i % 5 = 0; SELECT SLEEP(0.01);"; done | '
                f"mysql -h127.0.0.1 -P{env.stack.mariadb('slots_play').port} -u{env.stack.admin_credentials('slots_play')[0]} "
                f"-p{env.stack.admin_credentials('slots_play')[1]}",
            ]
        )
        for _ in range(3):  # kill it three times while the writer is busy, restart each time
            time.sleep(1.2)
            process.send_signal(signal.SIGKILL)
            process.wait()
            process = _capture_process(env, tmp_path / "mappings", ["slots_play"])
        assert writer.wait(timeout=120) == 0
        wait_caught_up(env, timeout=120)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert compare_with_source(env, "busy", ["id"]) > 300


def test_two_clusters_at_once_through_the_cli(local_stack: LocalStack, tmp_path: Path) -> None:
    envs = [new_env(local_stack, "poker_accounts"), new_env(local_stack, "roulette_accounts")]
    envs[1].prefix = envs[0].prefix  # one landing prefix, two clusters
    for env in envs:
        run_sql(env, "CREATE TABLE `{schema}`.t (id INT PRIMARY KEY, v VARCHAR(10))")
        run_sql(env, "INSERT INTO `{schema}`.t VALUES (1, 'snap')")
        write_mapping(env, tmp_path / "mappings", env.cluster_name, ["t"])
    process = _capture_process(envs[0], tmp_path / "mappings", [e.cluster_name for e in envs])
    try:
        for env in envs:
            wait_caught_up(env)
            run_sql(
                env,
                "INSERT INTO `{schema}`.t VALUES (2, 'cdc')",
                "UPDATE `{schema}`.t SET v = 'upd' WHERE id = 1",
            )
        for env in envs:
            wait_caught_up(env)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    for env in envs:
        assert compare_with_source(env, "t", ["id"]) == 2
        status = env.store().read_json("status", env.cluster_name)
        assert status is not None and status["state"] == "stopped"
    shown = subprocess.run(
        [str(Path(sys.executable).with_name("cdc")), "capture", "status"],
        env={
            **os.environ,
            **envs[0].stack.environment(),
            "CDC_LANDING_PREFIX": envs[0].prefix,
            "CDC_MAPPINGS_DIR": str(tmp_path / "mappings"),
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for env in envs:
        line = next(line for line in shown.splitlines() if line.startswith(env.cluster_name))
        assert "stopped" in line and "I 1" in line and "U 1" in line and "checkpoint 0-" in line


def background_service_pid(stack: LocalStack) -> int:
    return int((stack.state_dir / "capture" / "capture.pid").read_text())


def test_clusters_in_one_process_fail_alone(local_stack: LocalStack, tmp_path: Path) -> None:
    """One process captures every cluster, a thread each: a cluster whose source is unreachable keeps retrying and
    one whose mapping names an unset variable stops with its error, while the healthy cluster streams as usual."""
    healthy, unreachable, misconfigured = (
        new_env(local_stack, name) for name in ("poker_accounts", "roulette_accounts", "slots_accounts")
    )
    unreachable.prefix = misconfigured.prefix = healthy.prefix
    for env in (healthy, unreachable, misconfigured):
        run_sql(env, "CREATE TABLE `{schema}`.t (id INT PRIMARY KEY)", "INSERT INTO `{schema}`.t VALUES (1)")
        write_mapping(env, tmp_path / "mappings", env.cluster_name, ["t"])
    document = json.loads((tmp_path / "mappings" / "slots_accounts.json").read_text())
    document["connection"]["password_env"] = "CDC_TEST_UNSET_PASSWORD"
    (tmp_path / "mappings" / "slots_accounts.json").write_text(json.dumps(document))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    environment = {
        **os.environ,
        **healthy.stack.environment(),
        "CDC_LANDING_PREFIX": healthy.prefix,
        "CDC_MAPPINGS_DIR": str(tmp_path / "mappings"),
        "CDC_MYSQL_ROULETTE_ACCOUNTS_PORT": str(closed_port),
    }
    environment.pop("CDC_TEST_UNSET_PASSWORD", None)
    argv = [str(Path(sys.executable).with_name("cdc")), "capture", "run", "--flush-interval", "0.3"]
    with (tmp_path / "stderr").open("wb") as stderr:
        process = subprocess.Popen(argv, env=environment, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_caught_up(healthy)
        run_sql(healthy, "INSERT INTO `{schema}`.t VALUES (2)", "UPDATE `{schema}`.t SET id = 3 WHERE id = 1")
        wait_caught_up(healthy, timeout=20)
        statuses = {
            cluster: healthy.store().read_json("status", cluster)
            for cluster in ("poker_accounts", "roulette_accounts", "slots_accounts")
        }
        assert statuses["poker_accounts"]["state"] == "streaming"
        assert statuses["roulette_accounts"]["state"] == "reconnecting"
        assert "source or S3 unreachable" in statuses["roulette_accounts"]["errors"][0]
        assert statuses["slots_accounts"]["state"] == "failed"
        assert "CDC_TEST_UNSET_PASSWORD" in statuses["slots_accounts"]["errors"][0]
        assert len({status["pid"] for status in statuses.values()}) == 1  # one process for all three
        assert statuses["poker_accounts"]["pid"] != process.pid  # ... under its supervisor
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 3  # a cluster stopped on an error: the supervisor leaves it stopped
    errors = (tmp_path / "stderr").read_text()
    assert "Error: capture of slots_accounts stopped" in errors and "CDC_TEST_UNSET_PASSWORD" in errors
    assert compare_with_source(healthy, "t", ["id"]) == 2
    assert healthy.store().read_json("status", "poker_accounts")["state"] == "stopped"


@pytest.mark.parametrize(
    ("key", "kind", "table"),
    [
        ("cdc/slots_play/bets/LOAD0000000A.parquet", "load", "bets"),
        ("cdc/slots_play/bets/2026/11/25/20261125-1134010000.parquet", "cdc", "bets"),
        ("cdc%2Fslots_play%2Fbets%2F20261125-1134010000-1.parquet", "cdc", "bets"),
    ],
)
def test_landing_keys_parse(key: str, kind: str, table: str) -> None:
    parsed = parse_key(key, "cdc")
    assert (parsed.kind, parsed.schema, parsed.table) == (kind, "slots_play", table)


@pytest.mark.parametrize(
    "key",
    [
        "other/slots_play/bets/LOAD00000001.parquet",
        "cdc/slots_play/bets/notes.txt",
        "cdc/slots_play/bets/2026/11/24/20261125-1134010000.parquet",
        "cdc/bets.parquet",
    ],
)
def test_keys_that_are_not_landing_files_are_named(key: str) -> None:
    with pytest.raises(NotALandingFile, match=key.split("/")[-1].split(".")[0][:6]):
        parse_key(key, "cdc")


def test_background_capture_starts_reports_and_stops(local_stack: LocalStack, tmp_path: Path) -> None:
    env = new_env(local_stack, "poker_accounts")
    run_sql(env, "CREATE TABLE `{schema}`.bg (id INT PRIMARY KEY)", "INSERT INTO `{schema}`.bg VALUES (1)")
    write_mapping(env, tmp_path / "mappings", "poker_accounts", ["bg"])
    cdc = str(Path(sys.executable).with_name("cdc"))
    variables = {
        **os.environ,
        "CDC_STATE_DIR": str(local_stack.state_dir),
        "CDC_LANDING_PREFIX": env.prefix,
        "CDC_MAPPINGS_DIR": str(tmp_path / "mappings"),
    }

    def cdc_run(*args: str) -> str:
        return subprocess.run([cdc, *args], env=variables, capture_output=True, text=True, check=True).stdout

    assert "capture started" in cdc_run("capture", "start")
    try:
        assert "already running" in cdc_run("capture", "start")
        wait_caught_up(env)
        run_sql(env, "INSERT INTO `{schema}`.bg VALUES (2)")
        wait_caught_up(env)
        assert "streaming" in cdc_run("capture", "status")
        # the capture process that crashes is started again by its supervisor and resumes at its checkpoint
        crashed = json.loads(cdc_run("capture", "status", "--json"))[0]["pid"]
        assert crashed != background_service_pid(local_stack)  # the clusters' process, not its supervisor
        os.kill(crashed, signal.SIGKILL)
        run_sql(env, "INSERT INTO `{schema}`.bg VALUES (3)")
        wait_caught_up(env, timeout=90)
        assert json.loads(cdc_run("capture", "status", "--json"))[0]["pid"] != crashed
        log = (local_stack.state_dir / "capture" / "capture.log").read_text()
        assert (
            "capture run --flush-interval 5.0 --unsupervised exited with -9; starting it again in 5 s" in log
        )
    finally:
        stopping = subprocess.run([cdc, "capture", "stop"], env=variables, capture_output=True, text=True)
        # on SIGTERM: a capture that had to be killed ends without its last flush and status
        assert (stopping.stdout.strip(), stopping.stderr) == ("capture stopped", "")
    status = cdc_run("capture", "status")
    log = (local_stack.state_dir / "capture" / "capture.log").read_text()
    assert "stopped" in status, status + "\ncapture log:\n" + log[-4000:]
    assert compare_with_source(env, "bg", ["id"]) == 3


def test_a_cluster_connection_uses_tls_as_its_mapping_variable_says(local_stack: LocalStack) -> None:
    """`tls_env` names the variable holding the TLS mode, for the capture's binlog connection (the reader's
    settings) and the snapshot/check connection alike: `disabled` connects over plain TCP, `preferred` (also when
    unset) falls back to it on a server without TLS (the local MariaDB has none), `required` refuses such a server;
    another value is refused naming the variable."""
    env = new_env(local_stack, "slots_accounts")
    server = env.replication()
    document = env.mapping().model_dump()
    document["connection"]["tls_env"] = "CDC_MYSQL_SLOTS_ACCOUNTS_TLS"
    cluster = ClusterMapping.model_validate(document)
    values = {
        "CDC_MYSQL_SLOTS_ACCOUNTS_HOST": server.host,
        "CDC_MYSQL_SLOTS_ACCOUNTS_PORT": str(server.port),
        "CDC_MYSQL_SLOTS_ACCOUNTS_USER": server.user,
        "CDC_MYSQL_SLOTS_ACCOUNTS_PASSWORD": server.password,
    }

    def connections(mode: str) -> list[pymysql.connections.Connection]:
        connection = cluster_connection(
            cluster, Settings.load({**values, "CDC_MYSQL_SLOTS_ACCOUNTS_TLS": mode})
        )
        assert connection.tls == (mode or "preferred")
        return [
            connection.connect(),
            pymysql.connect(**connection.settings()),
        ]  # the latter as the binlog reader

    for mode in ("disabled", "preferred", ""):
        for connection in connections(mode):
            with connection, connection.cursor() as cursor:
                cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
                assert cursor.fetchone()[1] == "", mode  # plain TCP
    with pytest.raises(pymysql.err.OperationalError, match="SSL is required"):
        connections("required")
    with pytest.raises(SettingError, match=r"CDC_MYSQL_SLOTS_ACCOUNTS_TLS='off'.*slots_accounts.*disabled"):
        cluster_connection(cluster, Settings.load({**values, "CDC_MYSQL_SLOTS_ACCOUNTS_TLS": "off"}))


def _binlog_file(env: CaptureEnv) -> str:
    """The source's current binlog file: events since its start are read again by `_write_events`."""
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute("SHOW MASTER STATUS")
        return str(cursor.fetchone()[0])


def _write_events(env: CaptureEnv, binlog_file: str, table: str) -> list[WriteRowsEvent]:
    """Every insert event of the env's `table` in `binlog_file` and after, read to the end (rows decoded)."""
    stream = BinLogStreamReader(
        connection_settings=env.replication().settings(),
        server_id=4242,
        log_file=binlog_file,
        log_pos=4,
        resume_stream=True,
        blocking=False,
        only_events=[WriteRowsEvent],
        only_schemas=[env.schema],
        only_tables=[table],
    )
    try:
        events = list(stream)
        for event in events:
            event.rows  # noqa: B018 - decoded while the stream is open
        return events
    finally:
        stream.close()


def _rows_and_column_lists(events: list[WriteRowsEvent]) -> list[tuple[int, list[Any]]]:
    return [(id(event.columns), list(row["values"].values())) for event in events for row in event.rows]


def test_a_table_map_is_parsed_once_per_table_definition(local_stack: LocalStack) -> None:
    """Each transaction repeats the table map; identical ones share one parse (capture.table_map_cache), a new
    definition is parsed again, and the rows decode exactly as with the reader's own parsing."""
    env = new_env(local_stack, "slots_play")
    run_sql(env, "CREATE TABLE `{schema}`.busy (id INT PRIMARY KEY, v DECIMAL(5,2), s VARCHAR(8))")
    start = _binlog_file(env)
    run_sql(
        env,
        *[f"INSERT INTO `{{schema}}`.busy VALUES ({i}, {i}.25, 'r{i}')" for i in range(5)],
        "ALTER TABLE `{schema}`.busy MODIFY v DECIMAL(9,4)",
        *[f"INSERT INTO `{{schema}}`.busy VALUES ({i}, {i}.1234, 'r{i}')" for i in range(5, 10)],
    )
    cached = _rows_and_column_lists(_write_events(env, start, "busy"))
    table_map_cache.apply(False)
    try:
        parsed_each_time = _rows_and_column_lists(_write_events(env, start, "busy"))
    finally:
        table_map_cache.apply(True)
    assert [values for _, values in cached] == [values for _, values in parsed_each_time]
    assert [values[1] for _, values in cached][4:6] == [Decimal("4.25"), Decimal("5.1234")]
    assert len({columns for columns, _ in cached}) == 2  # one parse per definition
    assert len({columns for columns, _ in parsed_each_time}) == 10


def test_information_schema_agrees_with_the_binlog_table_map_for_every_type(local_stack: LocalStack) -> None:
    """Unchanged columns must agree with their table map (else every table's first event would re-read its
    columns and take them from the table map); a changed one must not."""
    env = new_env(local_stack, "slots_accounts")
    create_every_type(env)
    start = _binlog_file(env)
    insert_every_type(env, EDGE_ROWS[:1])
    event = _write_events(env, start, "every_type")[0]
    mapping = env.table("every_type", ["id"])
    with contextlib.closing(env.admin()) as connection:
        shape = SourceTable(mapping, read_columns(connection, mapping, env.cluster_name))
    assert shape.agrees_with(event.columns)
    disagreeing = [
        spec.name
        for spec in shape.columns
        if not agrees_with_table_map(spec, next(c for c in event.columns if c.name == spec.name))
    ]
    assert disagreeing == []
    retyped = [ColumnSpec(c.name, "varchar(3)" if c.name != "id" else c.column_type) for c in shape.columns]
    assert not SourceTable(mapping, retyped).agrees_with(event.columns)
