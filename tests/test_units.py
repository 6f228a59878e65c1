"""Pure logic, without servers: the batch loader's SQL, the sensor's grouping of S3 events, the materialization
metadata, the streaming mode's change sequence numbers and protobuf rows."""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
from google.cloud import bigquery
from pymysqlreplication.packet import BinLogPacketWrapper
from pymysqlreplication.row_event import RowsEvent

from capture import binlog_fixes
from capture.columns import ColumnSpec
from capture.ddl import emptied_tables, fills_existing_rows, refilled_tables, truncated_table
from capture.runner import StopSignals
from capture.service import flush_time
from cdc.mappings import ClusterMapping, Mappings, TableMapping
from cdc_assets import merge_sql
from cdc_assets.content_check import ColumnDigest, chunking_for, column_digest
from cdc_assets.load_run import latency_metadata, quota_metadata, write_api_metadata
from cdc_assets.proto_rows import CHANGE_SEQUENCE, CHANGE_TYPE, ProtoRows, change_sequence_number
from cdc_assets.stream_loader import staleness_interval
from cdc_testing.oracle import key_text
from sensors import receiver
from sensors.sqs_sensor import collect

TABLES = merge_sql.BatchTables(
    stage="`p`.`d`.`_stage`",
    changelog="`p`.`d`.`t_changelog`",
    current="`p`.`d`.`t`",
    ledger="`p`.`d`.`t_loaded_files`",
)


def test_the_batch_script_is_one_transaction_with_the_ledger_inside_it() -> None:
    body = [merge_sql.insert_new_changes(TABLES, ["_op", "_change_seq", "id"])]
    script = merge_sql.batch_script(TABLES, body, [merge_sql.record_files(TABLES, "b1", 1)])
    statements = [s.strip() for s in script.split(";\n")]
    assert statements[0].startswith("DECLARE changes_before")
    assert statements[1] == "BEGIN TRANSACTION"
    assert statements.index("COMMIT TRANSACTION") > next(
        i for i, s in enumerate(statements) if "MERGE `p`.`d`.`t_loaded_files`" in s
    )
    assert statements[-1].startswith(
        "SELECT (SELECT COUNT(*) FROM `p`.`d`.`t_changelog`) - changes_before AS inserted"
    )


def test_new_changes_are_inserted_only_when_absent_by_sequence_and_op() -> None:
    sql = merge_sql.insert_new_changes(TABLES, ["_op", "_change_seq", "id"])
    assert "ON c.`_change_seq` = s.`_change_seq` AND c.`_op` = s.`_op`" in sql
    assert "WHEN NOT MATCHED THEN INSERT (`_op`, `_change_seq`, `id`)" in sql and "WHEN MATCHED" not in sql
    assert (
        "QUALIFY ROW_NUMBER() OVER (PARTITION BY `_change_seq`, `_op`" in sql
    )  # one batch repeating a change


def test_the_current_state_takes_the_latest_change_per_key_from_the_horizon() -> None:
    batch = merge_sql.set_current_state(
        TABLES, ["id", "part"], ["id", "part", "v"], "'0001'", batch_keys_only=True
    )
    assert "WHERE c.`_change_seq` >= '0001'" in batch
    assert "PARTITION BY `id`, `part` ORDER BY `_change_seq` DESC" in batch
    assert (
        "EXISTS (SELECT 1 FROM `p`.`d`.`_stage` AS s WHERE s.`id` = c.`id` AND s.`part` = c.`part`)" in batch
    )
    assert "WHEN MATCHED AND l.`_op` = 'D' THEN DELETE" in batch and "NOT MATCHED BY SOURCE" not in batch
    whole = merge_sql.set_current_state(TABLES, ["id"], ["id", "v"], "''", batch_keys_only=False)
    assert whole.endswith("WHEN NOT MATCHED BY SOURCE THEN DELETE;") and "_stage" not in whole


def test_identifiers_are_refused_unless_plain() -> None:
    with pytest.raises(Exception, match="not a valid BigQuery column name"):
        merge_sql.insert_new_changes(TABLES, ["id; DROP TABLE x"])


def test_latency_and_quota_metadata() -> None:
    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    commits = [now - dt.timedelta(seconds=s) for s in (1, 2, 3, 10)] + [None]
    assert latency_metadata(commits, now) == {
        "lag_s": 1.0,
        "latency_p50_s": 2.5,
        "latency_p95_s": 10.0,
        "latency_max_s": 10.0,
    }
    assert latency_metadata([], now) == {}
    assert quota_metadata(60, 1200, now) == {
        "load_jobs_today": 60,
        "projected_load_jobs_today": 120,
        "load_job_cap_per_table_day": 1200,
    }
    usage = write_api_metadata({"calls": 100, "bytes": 1000, "streams": 1}, now)
    assert usage["projected_write_api_calls_today"] == 200 and usage["write_streams_created_today"] == 1


def test_change_sequence_numbers_keep_the_order_of_change_sequences() -> None:
    sequences = [
        "0" * 35,
        "00000000010000000000001230000000001",
        "00000000010000000000001230000000002",
        "9" * 35,
    ]
    numbers = [change_sequence_number(s) for s in sequences]

    def key(number: str) -> tuple[int, ...]:  # how BigQuery compares them: section by section, as numbers
        return tuple(int(section, 16) for section in number.split("/"))

    assert sorted(numbers, key=key) == numbers and len(set(numbers)) == 4
    assert all(len(section) <= 16 for n in numbers for section in n.split("/"))
    with pytest.raises(ValueError):
        change_sequence_number("12a")


def test_protobuf_rows_carry_each_type_in_bigquerys_wire_form() -> None:
    fields = [
        bigquery.SchemaField(n, t)
        for n, t in (
            ("ts", "TIMESTAMP"),
            ("day", "DATE"),
            ("at", "DATETIME"),
            ("n", "NUMERIC"),
            ("b", "BYTES"),
            ("f", "BOOLEAN"),
        )
    ]
    rows = ProtoRows(fields)
    when = dt.datetime(2026, 11, 30, 1, 2, 3, 4, tzinfo=dt.UTC)
    table = pa.table(
        {
            "ts": pa.array([when, None], pa.timestamp("us", tz="UTC")),
            "day": pa.array([dt.date(2026, 11, 30), None], pa.date32()),
            "at": pa.array([dt.datetime(2026, 11, 30, 1, 2, 3, 4), None], pa.timestamp("us")),
            "n": pa.array([Decimal("-1.500000000"), None], pa.decimal128(38, 9)),
            "b": pa.array([b"", None], pa.binary()),
            "f": pa.array([False, None], pa.bool_()),
        }
    )
    first, second = (
        rows.message_class.FromString(r) for r in rows.encode(table, ["UPSERT", "DELETE"], ["1", "2"])
    )
    assert (
        first.ts == int(when.timestamp() * 1_000_000)
        and first.day == (dt.date(2026, 11, 30) - dt.date(1970, 1, 1)).days
    )
    assert first.at == "2026-11-30 01:02:03.000004" and first.n == "-1.500000000"
    assert (
        first.HasField("b") and first.b == b"" and first.HasField("f") and first.f is False
    )  # empty and false kept
    assert first._CHANGE_TYPE == "UPSERT" and second._CHANGE_TYPE == "DELETE"
    assert not second.HasField("ts") and not second.HasField("b")  # NULL: absent


def test_the_local_bigquery_server_decodes_change_rows_column_by_column_as_its_stock_row_decoder_does() -> (
    None
):
    """`bigquery_cdc._decoded_columns` (each row parsed once, values read per column, coerced only when not already
    of their Arrow type's Python type) gives the table stock's dict-per-row decoding and per-value coercion give:
    NULLs, empty bytes, false, utf8mb4, JSON and NUMERIC text, epoch microseconds and days, and text sent for an
    INT64 column (coerced)."""
    from bqemulator.storage.arrow_bridge import _coerce_to_arrow_value
    from bqemulator.streaming.proto_deserializer import ProtoRowDecoder

    from local_stack.bigquery_cdc import _decoded_columns

    kinds = {
        "id": "INT64",
        "n": "NUMERIC",
        "s": "STRING",
        "j": "JSON",
        "b": "BYTES",
        "f": "BOOL",
        "x": "FLOAT64",
    }
    kinds |= {"ts": "TIMESTAMP", "day": "DATE", "at": "DATETIME", "text_id": "STRING"}
    rows = ProtoRows([bigquery.SchemaField(name, kind) for name, kind in kinds.items()])
    table = pa.table(
        {
            "id": pa.array([9223372036854775807, None, -1], pa.int64()),
            "n": pa.array(
                [Decimal("18446744073709551615.5"), None, Decimal("-0.000000001")], pa.decimal128(38, 9)
            ),
            "s": pa.array(["日本🎰", None, ""]),
            "j": pa.array(['{"a": [1, "é"]}', None, "null"]),
            "b": pa.array([b"", None, b"\x00\xff"], pa.binary()),
            "f": pa.array([False, None, True]),
            "x": pa.array([0.1, None, -2.5]),
            "ts": pa.array(
                [dt.datetime(2026, 11, 30, 1, 2, 3, 4, tzinfo=dt.UTC), None, None], pa.timestamp("us", "UTC")
            ),
            "day": pa.array([dt.date(1000, 1, 1), None, dt.date(9999, 12, 31)], pa.date32()),
            "at": pa.array([dt.datetime(2026, 11, 30, 1, 2, 3, 4), None, None], pa.timestamp("us")),
            "text_id": pa.array(["42", None, "-7"]),
        }
    )
    payload = rows.encode(table, ["UPSERT", "DELETE", "UPSERT"], ["1", "2", "3"])
    target = pa.schema(
        [
            *[("id", pa.int64()), ("n", pa.decimal128(38, 9)), ("s", pa.string()), ("j", pa.string())],
            *[("b", pa.binary()), ("f", pa.bool_()), ("x", pa.float64()), ("ts", pa.timestamp("us", "UTC"))],
            *[
                ("day", pa.date32()),
                ("at", pa.timestamp("us")),
                ("text_id", pa.int64()),
                ("absent", pa.string()),
            ],
        ]
    )
    decoder = ProtoRowDecoder(rows.descriptor)
    decoded = [decoder.decode(raw) for raw in payload]
    stock = pa.table(
        {
            f.name: pa.array([_coerce_to_arrow_value(d.get(f.name), f.type) for d in decoded], f.type)
            for f in target
        }
        | {
            name: pa.array([d.get(name) for d in decoded], pa.string())
            for name in (CHANGE_TYPE, CHANGE_SEQUENCE)
        }
    )

    ours = _decoded_columns(decoder, payload, target)

    assert ours.equals(stock), ours.to_pylist()
    assert ours.column("text_id").to_pylist() == [
        42,
        None,
        -7,
    ]  # text for an INT64 column: coerced, as stock does
    assert ours.column("b").to_pylist() == [b"", None, b"\x00\xff"] and ours.column("absent").null_count == 3


def test_max_staleness_is_written_as_bigquerys_interval() -> None:
    assert staleness_interval(15) == "0-0 0 0:15:0" and staleness_interval(0.5) == "0-0 0 0:0:30"
    assert staleness_interval(1500) == "0-0 1 1:0:0"


class FakeQueue:
    """An SQS queue as the sensor uses it: messages out, dead letters and deletions recorded."""

    def __init__(self, bodies: list[dict[str, Any]]):
        self.messages = [
            {
                "MessageId": f"m{i}",
                "ReceiptHandle": f"r{i}",
                "Body": json.dumps(b),
                "Attributes": {"ApproximateReceiveCount": "1"},
            }
            for i, b in enumerate(bodies)
        ]
        self.deleted: list[str] = []
        self.dead: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def receive_message(self, **_: Any) -> dict[str, Any]:
        with self.lock:  # the sensor's receivers call at once
            batch, self.messages = self.messages[:10], self.messages[10:]
        return {"Messages": batch}

    def delete_message(self, QueueUrl: str, ReceiptHandle: str) -> None:
        self.deleted.append(ReceiptHandle)


class FakeLanding:
    queue_url = "queue"
    prefix = "cdc"

    def __init__(self, queue: FakeQueue):
        self.queue = queue

    def sqs(self) -> FakeQueue:
        return self.queue

    def dead_letter(self, body: str, reason: str, receipt_handle: str | None = None) -> None:
        self.queue.dead.append((body, reason))


def _event(*keys: str) -> dict[str, Any]:
    return {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": k}}} for k in keys]}


def _mappings(*tables: TableMapping) -> Mappings:
    """One cluster mapping `tables`."""
    connection = {"host_env": "H", "port_env": "P", "user_env": "U", "password_env": "W"}
    cluster = {"cluster": "c", "connection": connection, "tables": [t.model_dump() for t in tables]}
    return Mappings(directory=Path("."), clusters=(ClusterMapping.model_validate(cluster),))


def test_collect_groups_files_per_table_and_day_and_dead_letters_the_rest() -> None:
    table = TableMapping(source="db.bets", target="game.bets", primary_key=["id"])
    mappings = _mappings(table)
    day1, day2 = (
        "cdc/db/bets/2026/11/29/20261129-2359590000.parquet",
        "cdc/db/bets/2026/11/30/20261130-0000010000.parquet",
    )
    queue = FakeQueue(
        [
            _event(day1.replace("/", "%2F")),  # moto encodes '/' too
            _event(day1, day2),  # a duplicate event of the same file, and the next day's
            {"Event": "s3:TestEvent"},
            {"not": "an s3 event"},
            _event("cdc/db/unmapped/LOAD00000001.parquet"),
            {"Records": [{"eventName": "ObjectRemoved:Delete", "s3": {"object": {"key": day1}}}]},
            {"source": "aws.s3", "detail-type": "Object Created", "detail": {"object": {"key": day2}}},
        ]
    )
    log = type("Log", (), {"error": lambda self, m: None})()
    grouped = sorted(collect(FakeLanding(queue), mappings, log), key=lambda f: f.day)  # type: ignore[arg-type]
    assert [(f.day, sorted(f.keys)) for f in grouped] == [("2026-11-29", [day1]), ("2026-11-30", [day2])]
    # m6 is the EventBridge event of day2's file
    assert set(grouped[0].receipts) == {"m0", "m1"} and set(grouped[1].receipts) == {"m1", "m6"}
    assert queue.deleted == ["r2", "r5"]  # the TestEvent and the deletion: nothing to load
    reasons = " | ".join(reason for _, reason in queue.dead)
    assert "neither an S3 event notification" in reasons and "db.unmapped is not in the mappings" in reasons


class TimedQueue(FakeQueue):
    """Messages that become visible at given seconds after the first receive (a flush's files land over time)."""

    def __init__(self, waves: list[tuple[float, list[dict[str, Any]]]]):
        super().__init__([body for _, bodies in waves for body in bodies])
        self.visible_at = [at for at, bodies in waves for _ in bodies]
        self.started: float | None = None

    def receive_message(self, **_: Any) -> dict[str, Any]:
        self.started = self.started or time.monotonic()
        elapsed = time.monotonic() - self.started
        ready = [i for i, at in enumerate(self.visible_at) if at <= elapsed][:10]
        batch = [self.messages[i] for i in ready]
        self.messages = [m for i, m in enumerate(self.messages) if i not in ready]
        self.visible_at = [at for i, at in enumerate(self.visible_at) if i not in ready]
        return {"Messages": batch}


def test_a_tick_takes_the_files_that_land_right_after_its_first_and_leaves_later_ones() -> None:
    tables = [TableMapping(source=f"db.t{i}", target=f"game.t{i}", primary_key=["id"]) for i in range(3)]
    mappings = _mappings(*tables)
    key = "cdc/db/t{}/20261201-0400000000.parquet".format
    queue = TimedQueue([(0.0, [_event(key(0))]), (0.15, [_event(key(1))]), (2.5, [_event(key(2))])])
    log = type("Log", (), {"error": lambda self, m: None})()
    grouped = collect(FakeLanding(queue), mappings, log, wait_seconds=1)  # type: ignore[arg-type]
    assert sorted(f.table.source for f in grouped) == ["db.t0", "db.t1"]  # the third is the next tick's
    assert len(queue.messages) == 1


def test_captures_flush_on_the_same_clock_multiples() -> None:
    assert flush_time(1_000.2, 5) == flush_time(1_004.9, 5) == 1_005.0
    assert flush_time(1_005.0, 5) == 1_010.0 and flush_time(12.1, 0.3) == pytest.approx(12.3)


def test_the_oracle_compares_numeric_keys_by_value_and_keeps_other_text() -> None:
    assert key_text(Decimal("7.000000000")) == key_text("7") == key_text(7) == "7"
    assert key_text(Decimal("-2.50")) == key_text("-2.5") == "-2.5"
    assert key_text("9e4999") == "9e4999"  # a text column in an all-columns key: not a 5,000-digit number
    assert key_text("Infinity") == "Infinity" and key_text("0x1F") == "0x1F"


def test_a_decimal_mapped_to_string_is_plain_decimal_text() -> None:
    """type_overrides STRING on a DECIMAL (a wide one the local BigQuery server cannot hold): MySQL's digits, never
    Python's exponent form ('0E-10', '1.000E-7')."""
    normalise = ColumnSpec("wide", "decimal(38,10)", override="STRING").normaliser()
    assert normalise is not None
    assert normalise(Decimal("0E-10"), "") == "0.0000000000"
    assert normalise(Decimal("1.000E-7"), "") == "0.0000001000"
    assert normalise(Decimal("-12345678901234567890123456.7890000000"), "") == (
        "-12345678901234567890123456.7890000000"
    )
    assert normalise(None, "") is None


def test_content_digests_follow_the_bigquery_type_and_name_what_is_not_compared() -> None:
    """Each column's normalised text is the same expression of the value on both servers (the live test proves
    they agree); a column missing in BigQuery compares as NULL; approximate types are named, not compared."""
    year = column_digest(ColumnSpec("y", "year(4)"), "INTEGER")
    assert isinstance(year, ColumnDigest) and year.mysql == "CAST(`y` + 0 AS CHAR)"
    assert year.bigquery == "CAST(`y` AS STRING)"
    flag = column_digest(ColumnSpec("vip", "tinyint(1)", override="BOOL"), "BOOLEAN")
    assert isinstance(flag, ColumnDigest) and flag.bigquery == "CAST(CAST(`vip` AS INT64) AS STRING)"
    added = column_digest(ColumnSpec("c", "varchar(4)"), None)
    assert isinstance(added, ColumnDigest) and added.bigquery == "CAST(NULL AS STRING)"
    assert "not compared" in str(column_digest(ColumnSpec("f", "double"), "FLOAT"))
    assert "no content rule" in str(
        column_digest(ColumnSpec("d", "datetime(6)", override="STRING"), "STRING")
    )


def test_truncate_statements_name_their_table() -> None:
    assert truncated_table("TRUNCATE TABLE accounts", "game") == ("game", "accounts")
    assert truncated_table("truncate `my db`.`acc``ounts`;", "") == ("my db", "acc`ounts")
    assert truncated_table("/* app */ TRUNCATE game . accounts", "x") == ("game", "accounts")
    assert truncated_table("CREATE TABLE truncate_log (id INT)", "game") is None
    assert truncated_table("DELETE FROM accounts", "game") is None
    assert truncated_table("ALTER TABLE accounts TRUNCATE PARTITION p1", "game") is None


def test_alter_statements_that_give_existing_rows_a_value_are_recognised() -> None:
    assert fills_existing_rows("ALTER TABLE t ADD COLUMN c VARCHAR(4) NOT NULL DEFAULT 'x'", "s") == (
        "s",
        "t",
    )
    assert fills_existing_rows("alter table `s`.`t` add c int default 0", "") == ("s", "t")
    assert fills_existing_rows("ALTER TABLE t ADD c INT NOT NULL, ADD INDEX (c)", "s") == ("s", "t")
    assert fills_existing_rows("ALTER TABLE t ADD c INT AS (a + 1) STORED", "s") == ("s", "t")
    assert fills_existing_rows("ALTER TABLE t ADD (c INT DEFAULT 7, d INT)", "s") == ("s", "t")
    assert fills_existing_rows("ALTER TABLE t ADD c INT NULL DEFAULT NULL", "s") is None
    assert fills_existing_rows("ALTER TABLE t ADD c INT", "s") is None
    assert fills_existing_rows("ALTER TABLE t ADD INDEX i (a), ADD UNIQUE KEY u (b)", "s") is None
    assert fills_existing_rows("ALTER TABLE t MODIFY c INT NOT NULL DEFAULT 3", "s") is None
    assert fills_existing_rows("ALTER TABLE t ADD c VARCHAR(9) DEFAULT 'a, NOT NULL'", "s") == ("s", "t")
    assert fills_existing_rows("CREATE TABLE t (c INT NOT NULL DEFAULT 1)", "s") is None


def test_statements_that_empty_or_refill_a_table_without_row_events() -> None:
    assert emptied_tables("DROP TABLE IF EXISTS `g`.`a`, b", "s") == [("g", "a"), ("s", "b")]
    assert emptied_tables("RENAME TABLE a TO a_old, a_new TO a", "s") == [("s", "a"), ("s", "a_new")]
    assert refilled_tables("RENAME TABLE a TO a_old, a_new TO a", "s") == [("s", "a_old"), ("s", "a")]
    assert emptied_tables("ALTER TABLE a RENAME TO b", "s") == [("s", "a")]
    assert refilled_tables("ALTER TABLE a RENAME TO b", "s") == [("s", "b")]
    assert emptied_tables("ALTER TABLE a RENAME COLUMN x TO y", "s") == []
    assert emptied_tables("TRUNCATE a", "s") == [("s", "a")]
    assert refilled_tables("ALTER TABLE a ADD c INT NOT NULL", "s") == [("s", "a")]
    assert emptied_tables("CREATE TABLE a (id INT)", "s") == refilled_tables("DROP TABLE a", "s") == []


def test_content_check_windows_rotate_through_a_big_table() -> None:
    """A table whose key span exceeds the rows a run may read is compared one window per run, another each time."""
    table = TableMapping(source="s.t", target="d.t", primary_key=["id"])
    specs = {"id": ColumnSpec("id", "bigint(20)")}
    first = chunking_for(table, specs, [], (1, 1_000_000), 200_000, now=0.0, key_type="INTEGER")
    assert first.mysql_scope == "`id` >= 0 AND `id` < 200000" and "(1 of 6)" in first.description
    later = chunking_for(table, specs, [], (1, 1_000_000), 200_000, now=600.0 * 5, key_type="INTEGER")
    assert later.mysql_scope == later.bigquery_scope == "`id` >= 1000000 AND `id` < 1200000"
    small = chunking_for(table, specs, [], (1, 150_000), 200_000, now=0.0, key_type="INTEGER")
    assert small.mysql_scope == "TRUE" and small.bigquery_chunk == "CAST(DIV(`id`, 100000) AS STRING)"
    unsigned = chunking_for(table, specs, [], (1, 150_000), 200_000, now=0.0, key_type="NUMERIC")
    assert unsigned.bigquery_chunk == "CAST(CAST(TRUNC(`id` / 100000) AS INT64) AS STRING)"


def test_landing_clients_share_the_parsed_service_models_of_the_process() -> None:
    """Each LandingResource (a run, a sensor tick) makes its own S3 and SQS clients, but the service models behind
    them are parsed once per process (cdc.clients.aws_session), and the resource's settings still apply."""
    from botocore import UNSIGNED

    from cdc.clients import aws_session
    from cdc_assets.resources import LandingResource

    def resource(**extra: Any) -> LandingResource:
        return LandingResource(
            bucket="landing",
            endpoint_url="http://127.0.0.1:9",
            region_name="eu-west-1",
            max_attempts=7,
            **extra,
        )

    first, second = resource(), resource(use_unsigned_session=True)
    s3, sqs, other_s3 = first.s3(), first.sqs(), second.s3()
    assert first.s3() is s3 and s3 is not other_s3  # one client per resource
    loader = aws_session()._session.get_component("data_loader")
    assert s3._loader is sqs._loader is other_s3._loader is loader
    assert s3.meta.endpoint_url == "http://127.0.0.1:9" and s3.meta.region_name == "eu-west-1"
    assert s3.meta.config.retries["total_max_attempts"] == 8  # 7 retries

    def signer(client: Any) -> Any:
        return client.meta.events.emit_until_response(
            "choose-signer.s3.ListObjectsV2",
            signing_name="s3",
            region_name="eu-west-1",
            signature_version="s3v4",
            context={},
        )[1]

    assert signer(other_s3) is UNSIGNED and signer(s3) is not UNSIGNED


class _Packet(BinLogPacketWrapper):
    """The reader's packet over fixed bytes, with its own integer readers (the stock decoders call them)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: float) -> bytes:
        chunk, self.data = self.data[: int(size)], self.data[int(size) :]
        return chunk

    def unread(self, data: bytes) -> None:
        self.data = data + self.data


def _stock(method: str, raw: bytes, column: Any) -> Any:
    """Decode `raw` with mysql-replication's own (unpatched) decoder; assert it read exactly `raw`."""
    event = object.__new__(RowsEvent)
    event.packet = _Packet(raw)  # type: ignore[assignment]
    if method == "timestamp2":  # inline in the reader: seconds, then its fraction reader
        seconds = event.packet.read_int_be_by_size(4)
        value = dt.datetime.utcfromtimestamp(seconds)
        fraction = binlog_fixes.STOCK_DECODERS["_RowsEvent__read_fsp"](event, column)
        value = value.replace(microsecond=fraction) if fraction else value
    else:
        value = binlog_fixes.STOCK_DECODERS[method](event, column)
    assert event.packet.data == b"", f"{method} left bytes unread"
    return value


def _decimal_binary(text: str, precision: int, scale: int) -> bytes:
    """MySQL's decimal2bin (sql-common/decimal.c), written from its description, for the comparison."""
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("-").partition(".")
    whole = (
        whole.rjust(precision - scale, "0") if precision > scale else ""
    )  # DECIMAL(9,9): no integer digits
    fraction = fraction.ljust(scale, "0")
    sizes = binlog_fixes.BYTES_FOR_DIGITS
    chunks: list[tuple[str, int]] = []
    lead = len(whole) % 9
    if lead:
        chunks.append((whole[:lead], sizes[lead]))
    chunks += [(whole[i : i + 9], 4) for i in range(lead, len(whole), 9)]
    chunks += [(fraction[i : i + 9], 4) for i in range(0, scale - scale % 9, 9)]
    if scale % 9:
        chunks.append((fraction[scale - scale % 9 :], sizes[scale % 9]))
    raw = bytearray(b"".join(int(digits).to_bytes(width, "big") for digits, width in chunks))
    if negative:
        raw = bytearray(byte ^ 0xFF for byte in raw)
    raw[0] ^= 0x80
    return bytes(raw)


def test_fast_decimal_decoder_equals_the_readers_value_for_value() -> None:
    rng = random.Random(15)
    for precision, scale in [
        (18, 4),
        (65, 10),
        (38, 10),
        (10, 0),
        (65, 30),
        (9, 9),
        (1, 0),
        (12, 2),
        (20, 19),
    ]:
        integral = precision - scale
        samples = ["0", "1", "-1", "9" * integral or "0", "-" + ("9" * integral or "0")]
        samples += [
            ("-" if rng.random() < 0.5 else "") + str(rng.randrange(10**integral)) for _ in range(200)
        ]
        samples = samples if integral else ["0", "-0"] * 50  # DECIMAL(9,9): a fraction only
        for whole in samples:
            for _ in range(3):
                text = f"{whole}.{rng.randrange(10**scale):0{scale}d}" if scale else whole
                raw = _decimal_binary(text, precision, scale)
                column = SimpleNamespace(precision=precision, decimals=scale)
                fast = binlog_fixes.decode_decimal(raw, precision, scale)
                stock = _stock("_RowsEvent__read_new_decimal", raw, column)
                assert fast == Decimal(text), (precision, scale, text)
                assert str(fast) == str(stock), (precision, scale, text)  # same digits, sign and exponent


def test_fast_datetime2_and_timestamp2_decoders_equal_the_readers() -> None:
    rng = random.Random(15)
    moments = [(0, 0, 0, 0, 0, 0), (2026, 2, 30, 1, 2, 3), (1000, 1, 1, 0, 0, 0), (9999, 12, 31, 23, 59, 59)]
    moments += [
        (rng.randrange(1, 10000), rng.randrange(1, 13), rng.randrange(1, 29), rng.randrange(24), rng.randrange(60),
         rng.randrange(60))
        for _ in range(500)
    ]  # fmt: skip
    for fsp in range(7):
        column = SimpleNamespace(fsp=fsp)
        width = (fsp + 1) // 2
        for year, month, day, hour, minute, second in moments:
            fraction = rng.randrange(10**fsp) * 10 ** (2 * width - fsp) if fsp else 0
            packed = 1 << 39 | (year * 13 + month) << 22 | day << 17 | hour << 12 | minute << 6 | second
            raw = packed.to_bytes(5, "big") + fraction.to_bytes(width, "big")
            fast = binlog_fixes.decode_datetime2(raw, fsp)
            assert fast == _stock("_RowsEvent__read_datetime2", raw, column), (fsp, raw)
            if fast is not None:
                assert fast.microsecond == fraction * 10 ** (6 - 2 * width)
            seconds = rng.randrange(2**31)
            raw = seconds.to_bytes(4, "big") + fraction.to_bytes(width, "big")
            assert binlog_fixes.decode_timestamp2(raw, fsp) == _stock("timestamp2", raw, column), (fsp, raw)
            event = object.__new__(RowsEvent)
            event.packet = _Packet(raw[4:])  # type: ignore[assignment]
            assert binlog_fixes._read_fsp(event, column) == binlog_fixes.microseconds(raw[4:], fsp)


def test_the_capture_process_loads_no_bigquery_or_dagster_libraries() -> None:
    """The capture writes to S3 only: the Google clients and gRPC (~100 MB and seconds of start each process) stay
    out of it (docs/benchmarks.md, the capture's memory)."""
    probe = "import sys, capture.runner, capture.supervisor; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    ).stdout.split()
    assert "capture.service" in loaded
    heavy = [m for m in loaded if m.split(".")[0] in ("grpc", "dagster") or m.startswith("google.cloud")]
    assert heavy == []


def test_a_second_stop_signal_handled_inside_the_first_ones_stop_does_not_hang_the_capture() -> None:
    """`cdc capture stop` signals the capture twice (its process group, and the supervisor passes its own on). The
    second handler may run inside the first's `Event.set`, holding the event's lock in the same thread: a handler
    that set the event itself waited there for good, and the capture ended by SIGKILL without its status."""
    stop = threading.Event()
    signals = StopSignals(stop)
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        signals.install()
        assert signal.getsignal(signal.SIGTERM) == signals.handle == signal.getsignal(signal.SIGINT)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    handled = threading.Event()

    def second_signal_inside_the_first_stop() -> None:
        with stop._cond:  # as inside Event.set, where the main thread's next signal handler runs
            signals.handle(signal.SIGTERM, None)
        handled.set()

    threading.Thread(target=second_signal_inside_the_first_stop, daemon=True).start()
    assert handled.wait(5), "the signal handler waited for the stop event's lock"
    assert not stop.is_set()  # passed on by the main thread, between its joins
    signals.pass_on()
    assert stop.is_set()


class Trickle(FakeQueue):
    """A queue where a message lands every 0.1 s and every receive takes 0.1 s: files landing without a pause."""

    def __init__(self, bodies: list[dict[str, Any]]):
        super().__init__(bodies)
        self.began = time.monotonic()
        self.taken = 0

    def receive_message(self, **_: Any) -> dict[str, Any]:
        time.sleep(0.1)
        with self.lock:
            landed = min(len(self.messages) + self.taken, int((time.monotonic() - self.began) / 0.1) + 1)
            count = min(10, landed - self.taken)
            batch, self.messages = self.messages[:count], self.messages[count:]
            self.taken += count
        return {"Messages": batch}


class Bursts(FakeQueue):
    """A queue whose every receive takes 0.1 s and comes back full: a backlog, or flushes landing in bursts."""

    def receive_message(self, **_: Any) -> dict[str, Any]:
        time.sleep(0.1)
        return super().receive_message()


def test_a_tick_stops_taking_files_that_keep_landing_but_drains_a_backlog() -> None:
    """Files landing without a pause (the captures' flushes, one after another) end a tick SETTLE_SECONDS after its
    first message - the daemon starts the next one at most 5 s after it began only if it ended by then; a backlog
    waiting at once is taken in one tick, and receives that keep coming back full end the tick COLLECT_SECONDS after
    it began (what it took is ordered then; the rest is the next tick's)."""
    tables = [TableMapping(source=f"db.t{i}", target=f"game.t{i}", primary_key=["id"]) for i in range(40)]
    mappings = _mappings(*tables)
    key = "cdc/db/t{}/20261201-0400000000.parquet".format
    log = type("Log", (), {"error": lambda self, m: None})()
    trickle = Trickle([_event(key(i)) for i in range(40)])  # every receive finds a few files, for 4 s
    began = time.monotonic()
    grouped = collect(FakeLanding(trickle), mappings, log, wait_seconds=1)  # type: ignore[arg-type]
    assert time.monotonic() - began < receiver.SETTLE_SECONDS + 1.0
    assert 0 < len(grouped) < 40 and len(trickle.messages) == 40 - len(grouped)
    backlog = FakeQueue([_event(key(i % 40)) for i in range(300)])  # all waiting at once
    grouped = collect(FakeLanding(backlog), mappings, log, wait_seconds=1)  # type: ignore[arg-type]
    assert len(grouped) == 40 and not backlog.messages
    bursts = Bursts([_event(key(i % 40)) for i in range(3000)])  # full receives, 0.1 s each
    began = time.monotonic()
    grouped = collect(FakeLanding(bursts), mappings, log, wait_seconds=1)  # type: ignore[arg-type]
    assert time.monotonic() - began < receiver.COLLECT_SECONDS + 0.5
    taken = 3000 - len(bursts.messages)
    # the receivers at once: twice what one receiver takes in the time (35 receives), at most the tick's cap (and
    # the receives already in flight when it was reached)
    assert len(grouped) == 40 and 2 * 10 * receiver.COLLECT_SECONDS / 0.1 < taken
    assert taken <= receiver.MAX_MESSAGES_PER_TICK + 10 * receiver.RECEIVERS


class Landing(FakeQueue):
    """A queue as SQS long-polls it, where `later` messages land `after` seconds from its creation."""

    def __init__(self, bodies: list[dict[str, Any]], later: list[dict[str, Any]], after: float):
        super().__init__(bodies + later)
        self.messages, self.later = self.messages[: len(bodies)], self.messages[len(bodies) :]
        self.lands_at = time.monotonic() + after
        self.landed_at = 0.0

    def receive_message(self, **call: Any) -> dict[str, Any]:
        until = time.monotonic() + float(call.get("WaitTimeSeconds", 0))
        while True:
            with self.lock:
                if self.later and time.monotonic() >= self.lands_at:
                    self.messages, self.later, self.landed_at = (
                        self.messages + self.later,
                        [],
                        time.monotonic(),
                    )
            got = super().receive_message()
            if got["Messages"] or time.monotonic() >= until:
                return got
            time.sleep(0.02)

    def change_message_visibility_batch(self, **call: Any) -> dict[str, Any]:
        self.made_visible = getattr(self, "made_visible", []) + [
            e["ReceiptHandle"] for e in call["Entries"] if e["VisibilityTimeout"] == 0
        ]
        return {}


def test_the_continuous_receiver_orders_files_as_they_land_and_keeps_the_rest_for_the_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a stream run takes orders, the sensor's tick starts the continuous receiver: files that land after the
    tick are ordered to the stream run with no tick in between (a tick every 5 s took them up to 5 s later); a
    batch-mode table's file and a message that is not an S3 event wait for the next tick, which requests a load run
    for the first and dead-letters the second; without a tick for its lease the receiver stops and makes what it kept
    visible again."""
    import dataclasses

    import dagster as dg

    from cdc.settings import Settings
    from cdc_assets.lineage import bigquery_asset_key
    from cdc_assets.stream_run import ORDER_KEY, ORDER_SLOTS
    from cdc_assets.writers import HEARTBEAT_KEY
    from sensors import receiver
    from sensors.sqs_sensor import build_sqs_sensor
    from tests.support import waiting
    from tests.support.runs import add_started_stream_run

    bets = TableMapping(source="db.bets", target="game.bets", primary_key=["id"], load_mode="streaming")
    users = TableMapping(source="db.users", target="game.users", primary_key=["id"], load_mode="batch")
    settings = dataclasses.replace(Settings.load(), stream_run_minutes=3.0)
    sensor = build_sqs_sensor(
        _mappings(bets, users), [bigquery_asset_key(bets), bigquery_asset_key(users)], settings
    )
    bet_files = [f"cdc/db/bets/20261201-04000{n}0000.parquet" for n in (1, 2)]
    user_file = "cdc/db/users/20261201-0400010000.parquet"
    queue = Landing([], [_event(bet_files[0]), _event(user_file), {"not": "an s3 event"}], after=1.0)
    landing = FakeLanding(queue)

    def orders() -> list[dict[str, Any]]:
        values = instance.run_storage.get_cursor_values({f"{ORDER_KEY}{slot}" for slot in range(ORDER_SLOTS)})
        return sorted((json.loads(v) for v in values.values()), key=lambda o: o["sent"])

    try:
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            add_started_stream_run(instance, "stream", [bets.target], 3.0)
            instance.run_storage.set_cursor_values({HEARTBEAT_KEY + "stream": repr(time.time())})
            first = sensor(dg.build_sensor_context(instance=instance, resources={"landing": landing}))
            assert isinstance(first, dg.SensorResult) and not first.run_requests and not orders()
            assert receiver.running(landing.queue_url) is not None  # started by the tick
            [order] = waiting.wait_for(orders, "the receiver's order", timeout=10, interval=0.05)
            assert order["run"] == "stream"
            assert [(t["table"], t["keys"], t["receipts"]) for t in order["tables"]] == [
                ("game.bets", [bet_files[0]], ["r0"])
            ]
            with queue.lock:  # lands between ticks too
                queue.messages += FakeQueue([{}, {}, {}, _event(bet_files[1])]).messages[3:]
            waiting.wait_for(lambda: len(orders()) == 2, "the second order", timeout=10, interval=0.05)
            assert orders()[1]["tables"][0]["keys"] == [bet_files[1]]

            monkeypatch.setattr(receiver, "LEASE_SECONDS", 1.0)
            second = sensor(
                dg.build_sensor_context(
                    instance=instance, resources={"landing": landing}, cursor=first.cursor
                )
            )
            assert isinstance(second, dg.SensorResult)
            assert [r.asset_selection for r in second.run_requests or []] == [[bigquery_asset_key(users)]]
            assert [reason for _, reason in queue.dead] and "neither an S3 event" in queue.dead[0][1]
            assert json.loads(second.cursor or "{}")["order_slot"] == 2  # the receiver's two orders
            with queue.lock:  # a batch-mode table's file no tick takes: given back when the lease runs out
                queue.messages += FakeQueue([{}, {}, {}, {}, _event(user_file)]).messages[4:]
            waiting.wait_for(
                lambda: getattr(queue, "made_visible", []), "the lease to run out", timeout=10, interval=0.05
            )
            assert queue.made_visible == ["r4"] and len(orders()) == 2  # type: ignore[attr-defined]
            assert receiver.running(landing.queue_url) is None
    finally:
        receiver.stop_all()


def test_free_ports_come_from_below_the_kernels_range_for_outgoing_connections() -> None:
    """A port from the kernel's outgoing range could be taken by another process's client connection before the
    server binds it (a test's Dagster once found its port taken so)."""
    from local_stack.processes import LOWEST_FREE_PORT, _ephemeral_ports_start, free_port, port_is_free

    ports = [free_port() for _ in range(20)]
    assert all(LOWEST_FREE_PORT <= port < _ephemeral_ports_start() and port_is_free(port) for port in ports)
    assert len(set(ports)) > 1


def test_a_capture_behind_the_snapshot_makes_the_checks_not_exact_without_looking_at_the_landed_files() -> (
    None
):
    """While the capture's checkpoint is before the source's snapshot BigQuery cannot be complete at it: the checks
    say so without listing the table's landed files, asking the ledger or reading each file not loaded yet (work that
    competed with the loads while the pipeline caught up); with the capture past it, the landed files decide."""
    import io

    from cdc.sequence import BinlogPosition
    from cdc_assets.checks import SourceSnapshot, completeness

    class Checkpoints:
        def __init__(self, position: BinlogPosition) -> None:
            self.body = json.dumps({"file": position.file, "pos": position.pos}).encode()

        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
            assert "checkpoints" in Key, Key
            return {"Body": io.BytesIO(self.body)}

    class Landing:
        bucket, prefix = "landing", "cdc"

        def __init__(self, s3: Any) -> None:
            self._s3 = s3

        def s3(self) -> Any:
            return self._s3

    class Targets:
        asked: list[str] = []

        def __getattr__(self, name: str) -> Any:
            self.asked.append(name)
            raise AssertionError(f"the landed files were looked at ({name})")

    cluster = SimpleNamespace(cluster="c")
    snapshot = SourceSnapshot(0, {}, BinlogPosition("mysql-bin.000002", 400), dt.datetime.now(dt.UTC))
    behind = completeness(
        Landing(Checkpoints(BinlogPosition("mysql-bin.000002", 100))), Targets(), cluster, snapshot
    )  # type: ignore[arg-type]
    assert not behind.exact and behind.catching_up and "is before the snapshot" in behind.waiting_for[0]
    assert behind.checkpoint == "mysql-bin.000002:100" and not Targets.asked

    # no checkpoint (a DMS landing): not exact, but not catching up - the checks still compare, for reading
    class NoCheckpoint:
        exceptions = SimpleNamespace(NoSuchKey=KeyError)

        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
            raise KeyError(Key)

    unknown = completeness(Landing(NoCheckpoint()), Targets(), cluster, snapshot)  # type: ignore[arg-type]
    assert not unknown.exact and not unknown.catching_up and "no capture checkpoint" in unknown.waiting_for[0]
    with pytest.raises(AssertionError, match="landed files were looked at"):
        completeness(
            Landing(Checkpoints(BinlogPosition("mysql-bin.000002", 500))), Targets(), cluster, snapshot
        )  # type: ignore[arg-type]
