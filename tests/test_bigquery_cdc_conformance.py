"""The local BigQuery API server's Storage Write API and native CDC behave as BigQuery documents them.

Each test states BigQuery's documented behaviour and fails on stock bqemulator 1.4.0 (proven by
`test_bigquery_conformance_fails_on_stock.py`). References: https://cloud.google.com/bigquery/docs/change-data-capture
(UPSERT/DELETE, `_CHANGE_SEQUENCE_NUMBER`, primary keys, max_staleness, no DML on CDC tables),
https://cloud.google.com/bigquery/docs/write-api (requests, streams, BatchCommitWriteStreams), quotas (20 MB).
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.api_core import exceptions
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import types, writer

from cdc.clients import bigquery_write_client
from cdc_assets.proto_rows import ProtoRows
from local_stack.bigquery_emulator import BigQueryEmulatorServer
from tests.conftest import bigquery_scope

SCHEMA = [
    bigquery.SchemaField("id", "INTEGER", mode="REQUIRED"),
    bigquery.SchemaField("v", "STRING"),
]


@pytest.fixture(scope=bigquery_scope)
def write(bigquery_server: BigQueryEmulatorServer) -> Any:
    return bigquery_write_client(bigquery_server.write_endpoint)


def keyed_table(bq: bigquery.Client, dataset: str, **options: Any) -> bigquery.Table:
    table = bigquery.Table(f"{bq.project}.{dataset}.t_{uuid.uuid4().hex[:8]}", schema=SCHEMA)
    table.table_constraints = bigquery.table.TableConstraints(
        primary_key=bigquery.table.PrimaryKey(columns=["id"]), foreign_keys=None
    )
    for name, value in options.items():
        setattr(table, name, value)
    return bq.create_table(table)


def default_stream(table: bigquery.Table) -> str:
    return f"projects/{table.project}/datasets/{table.dataset_id}/tables/{table.table_id}/streams/_default"


def changes(
    write: Any, table: bigquery.Table, *rows: tuple[int, str | None, str, str], timeout: float = 60
) -> None:
    """(id, v, change type, change sequence number) rows on the table's default stream, in one request."""
    proto = ProtoRows(SCHEMA)
    data = pa.table({"id": [r[0] for r in rows], "v": [r[1] for r in rows]})
    serialized = proto.encode(data)
    with_change_columns = []
    for payload, (_, _, change_type, sequence) in zip(serialized, rows, strict=True):
        message = proto.message_class()
        message.ParseFromString(payload)
        message._CHANGE_TYPE = change_type
        message._CHANGE_SEQUENCE_NUMBER = sequence
        with_change_columns.append(message.SerializeToString())
    request = types.AppendRowsRequest(write_stream=default_stream(table))
    request.proto_rows = types.AppendRowsRequest.ProtoData(
        writer_schema=types.ProtoSchema(proto_descriptor=proto.descriptor),
        rows=types.ProtoRows(serialized_rows=with_change_columns),
    )
    for response in write.append_rows(iter([request]), timeout=timeout):
        if response.error.code:
            raise exceptions.from_grpc_status(response.error.code, response.error.message)


def state(bq: bigquery.Client, table: bigquery.Table) -> list[tuple[int, str | None]]:
    ref = f"`{table.project}.{table.dataset_id}.{table.table_id}`"
    return [
        (row.id, row.v)
        for row in bq.query(f"SELECT id, v FROM {ref} ORDER BY id", timeout=30).result(timeout=60)
    ]


def test_upserts_and_deletes_are_applied_per_primary_key(
    bq: bigquery.Client, dataset: str, write: Any
) -> None:
    table = keyed_table(bq, dataset)
    changes(write, table, (1, "a", "UPSERT", "1"), (1, "b", "UPSERT", "2"), (2, "x", "UPSERT", "3"))
    changes(write, table, (2, None, "DELETE", "4"), (3, "c", "UPSERT", "5"))
    assert state(bq, table) == [(1, "b"), (3, "c")]  # one row per key: the merged state


def test_the_highest_sequence_wins_and_an_equal_one_lets_the_later_write_win(
    bq: bigquery.Client, dataset: str, write: Any
) -> None:
    table = keyed_table(bq, dataset)
    changes(write, table, (1, "five", "UPSERT", "5"))
    changes(write, table, (1, "three", "UPSERT", "3"))  # older: ignored
    assert state(bq, table) == [(1, "five")]
    changes(write, table, (1, "five again", "UPSERT", "5"))  # equal: the later write wins
    assert state(bq, table) == [(1, "five again")]
    changes(write, table, (1, None, "DELETE", "4"))  # an older delete: ignored
    assert state(bq, table) == [(1, "five again")]
    # sections compare as numbers, not text: 10/0 is after 9/FFFF, A after 9
    changes(write, table, (1, "ten", "UPSERT", "A/0"), (1, "nine", "UPSERT", "9/FFFF"))
    assert state(bq, table) == [(1, "ten")]
    changes(write, table, (1, None, "DELETE", "B"))
    changes(write, table, (1, "late", "UPSERT", "A/1"))  # older than the delete: the row stays deleted
    assert state(bq, table) == []


def test_changes_acknowledged_before_a_restart_are_merged_after_it(
    bq: bigquery.Client, dataset: str, write: Any, bigquery_server: BigQueryEmulatorServer
) -> None:
    """An acknowledged append is durable: changes the server took (and merges only when the table is read) are
    merged after a restart, in order with the changes that follow."""
    table = keyed_table(bq, dataset)
    changes(write, table, (1, "a", "UPSERT", "1"), (2, "b", "UPSERT", "2"))
    changes(write, table, (1, None, "DELETE", "3"), (2, "c", "UPSERT", "4"))
    assert bigquery_server.stop()
    bigquery_server.start()
    write = bigquery_write_client(bigquery_server.write_endpoint)
    changes(
        write, table, (2, "older", "UPSERT", "3"), (3, "d", "UPSERT", "5")
    )  # 2@3 is older than 2@4: ignored
    assert state(bq, table) == [(2, "c"), (3, "d")]
    assert bq.get_table(table.reference).num_rows == 2


def test_the_primary_key_and_max_staleness_of_a_table_are_kept(bq: bigquery.Client, dataset: str) -> None:
    table = keyed_table(bq, dataset, max_staleness="0-0 0 0:15:0")
    got = bq.get_table(table.reference)
    assert got.table_constraints is not None and got.table_constraints.primary_key is not None
    assert got.table_constraints.primary_key.columns == ["id"]
    assert got.max_staleness == "0-0 0 0:15:0"


def test_primary_keys_and_max_staleness_in_ddl(bq: bigquery.Client, dataset: str) -> None:
    name = f"{bq.project}.{dataset}.ddl_{uuid.uuid4().hex[:8]}"
    bq.query(
        f"CREATE TABLE `{name}` (id INT64, part STRING, v STRING, PRIMARY KEY (id, part) NOT ENFORCED) "
        "OPTIONS (max_staleness = INTERVAL 15 MINUTE)"
    ).result()
    got = bq.get_table(name)
    assert got.table_constraints is not None and got.table_constraints.primary_key is not None
    assert got.table_constraints.primary_key.columns == ["id", "part"]
    assert got.max_staleness == "0-0 0 0:15:0"
    bq.query(f"ALTER TABLE `{name}` SET OPTIONS (max_staleness = INTERVAL '1:30:0' HOUR TO SECOND)").result()
    assert bq.get_table(name).max_staleness == "0-0 0 1:30:0"
    with pytest.raises(exceptions.GoogleAPICallError, match="Not found"):
        bq.query(f"ALTER TABLE `{name}_missing` SET OPTIONS (max_staleness = INTERVAL 15 MINUTE)").result()


def test_a_table_with_cdc_active_refuses_dml(bq: bigquery.Client, dataset: str, write: Any) -> None:
    table = keyed_table(bq, dataset)
    changes(write, table, (1, "a", "UPSERT", "1"))
    ref = f"`{table.project}.{table.dataset_id}.{table.table_id}`"
    for statement in (
        f"UPDATE {ref} SET v = 'x' WHERE id = 1",
        f"DELETE FROM {ref} WHERE id = 1",
        f"MERGE {ref} AS t USING (SELECT 1 AS id) AS s ON t.id = s.id WHEN MATCHED THEN DELETE",
    ):
        with pytest.raises(exceptions.BadRequest):
            bq.query(statement).result()
    assert state(bq, table) == [(1, "a")]


def test_googles_writer_sends_follow_up_requests_without_the_stream_name(
    bq: bigquery.Client, dataset: str, write: Any
) -> None:
    table = bq.create_table(bigquery.Table(f"{bq.project}.{dataset}.w_{uuid.uuid4().hex[:8]}", schema=SCHEMA))
    proto = ProtoRows(SCHEMA, change_columns=False)
    template = types.AppendRowsRequest(write_stream=default_stream(table))
    template.proto_rows = types.AppendRowsRequest.ProtoData(
        writer_schema=types.ProtoSchema(proto_descriptor=proto.descriptor)
    )
    stream = writer.AppendRowsStream(write, template)
    try:
        futures = []
        for ids in ([1, 2], [3]):  # the second request carries no write_stream (Google's writer omits it)
            request = types.AppendRowsRequest()
            request.proto_rows = types.AppendRowsRequest.ProtoData(
                rows=types.ProtoRows(
                    serialized_rows=proto.encode(pa.table({"id": ids, "v": ["x"] * len(ids)}))
                )
            )
            futures.append(stream.send(request))
        for future in futures:
            future.result(timeout=30)
    finally:
        stream.close()
    assert [row[0] for row in state(bq, table)] == [1, 2, 3]


def test_rows_appended_during_a_failed_load_stay(bq: bigquery.Client, dataset: str, write: Any) -> None:
    """A load job is atomic (a failed one changes nothing) and does not take rows appended meanwhile with it: REST
    and Storage Write API writes are ordered by one lock."""
    table = bq.create_table(bigquery.Table(f"{bq.project}.{dataset}.l_{uuid.uuid4().hex[:8]}", schema=SCHEMA))
    proto = ProtoRows(SCHEMA, change_columns=False)
    appended: list[int] = []
    refused: list[str] = []
    stop = threading.Event()

    def append() -> None:
        next_id = 10_000_000
        while not stop.is_set():
            request = types.AppendRowsRequest(write_stream=default_stream(table))
            request.proto_rows = types.AppendRowsRequest.ProtoData(
                writer_schema=types.ProtoSchema(proto_descriptor=proto.descriptor),
                rows=types.ProtoRows(serialized_rows=proto.encode(pa.table({"id": [next_id], "v": ["w"]}))),
            )
            errors = [r.error.message for r in write.append_rows(iter([request]), timeout=10) if r.error.code]
            if errors:
                refused.extend(errors)
            else:
                appended.append(next_id)
            next_id += 1
            time.sleep(0.005)

    # a big file whose last id is not a number: the load fails at the end of its INSERT and must roll back whole
    ids = [str(i) for i in range(400_000)] + ["not a number"]
    broken = pa.table({"id": ids, "v": ["b"] * len(ids)})
    thread = threading.Thread(target=append, daemon=True)
    thread.start()
    try:
        time.sleep(0.1)
        for _ in range(3):
            config = bigquery.LoadJobConfig(
                source_format=bigquery.SourceFormat.PARQUET,
                write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            )
            buffer = io.BytesIO()
            pq.write_table(broken, buffer)
            buffer.seek(0)
            with pytest.raises(exceptions.GoogleAPICallError):
                bq.load_table_from_file(buffer, table.reference, job_config=config, timeout=60).result(
                    timeout=60
                )
    finally:
        stop.set()
        thread.join(timeout=30)
    held = {row[0] for row in state(bq, table)}
    assert not refused, f"appends failed while a load ran: {refused[:3]}"
    assert appended and held == set(appended), f"{len(set(appended) - held)} appended rows were lost"


def test_batch_commit_commits_only_streams_of_its_parent_table(
    bq: bigquery.Client, dataset: str, write: Any
) -> None:
    tables = [
        bq.create_table(bigquery.Table(f"{bq.project}.{dataset}.p_{uuid.uuid4().hex[:8]}", schema=SCHEMA))
        for _ in range(2)
    ]
    parent = [f"projects/{t.project}/datasets/{t.dataset_id}/tables/{t.table_id}" for t in tables]
    stream = write.create_write_stream(
        parent=parent[0], write_stream=types.WriteStream(type_=types.WriteStream.Type.PENDING)
    )
    proto = ProtoRows(SCHEMA, change_columns=False)
    request = types.AppendRowsRequest(write_stream=stream.name)
    request.proto_rows = types.AppendRowsRequest.ProtoData(
        writer_schema=types.ProtoSchema(proto_descriptor=proto.descriptor),
        rows=types.ProtoRows(serialized_rows=proto.encode(pa.table({"id": [1], "v": ["p"]}))),
    )
    assert all(not r.error.code for r in write.append_rows(iter([request]), timeout=30))
    write.finalize_write_stream(name=stream.name)
    with pytest.raises(exceptions.InvalidArgument):
        write.batch_commit_write_streams(
            request=types.BatchCommitWriteStreamsRequest(parent=parent[1], write_streams=[stream.name])
        )
    assert state(bq, tables[0]) == [] and state(bq, tables[1]) == []
    write.batch_commit_write_streams(
        request=types.BatchCommitWriteStreamsRequest(parent=parent[0], write_streams=[stream.name])
    )
    assert state(bq, tables[0]) == [(1, "p")]


def _big_request(table: bigquery.Table, megabytes: float) -> Iterator[types.AppendRowsRequest]:
    proto = ProtoRows(SCHEMA, change_columns=False)
    value = "x" * 100_000
    rows = proto.encode(
        pa.table({"id": list(range(int(megabytes * 10))), "v": [value] * int(megabytes * 10)})
    )
    request = types.AppendRowsRequest(write_stream=default_stream(table))
    request.proto_rows = types.AppendRowsRequest.ProtoData(
        writer_schema=types.ProtoSchema(proto_descriptor=proto.descriptor),
        rows=types.ProtoRows(serialized_rows=rows),
    )
    yield request


def test_an_append_request_may_carry_up_to_20_mb(bq: bigquery.Client, dataset: str, write: Any) -> None:
    table = bq.create_table(bigquery.Table(f"{bq.project}.{dataset}.b_{uuid.uuid4().hex[:8]}", schema=SCHEMA))
    [accepted] = list(write.append_rows(_big_request(table, 15)))
    assert accepted.error.code == 0, accepted.error.message
    [refused] = list(write.append_rows(_big_request(table, 21)))
    assert refused.error.code != 0
    count = next(
        iter(
            bq.query(
                f"SELECT COUNT(*) AS n FROM `{table.project}.{table.dataset_id}.{table.table_id}`"
            ).result()
        )
    )
    assert count.n == 150


def test_reads_during_cdc_writes_see_whole_applies_and_never_hang(
    bq: bigquery.Client, dataset: str, write: Any
) -> None:
    """Reads (table metadata, queries) while CDC changes are applied on other connections return, and see each apply
    whole: every apply UPSERTs the same 50 keys, so every read counts exactly 50 rows.

    Last in the module: on a server that deadlocks here, the test fails at its deadline and nothing runs after it."""
    table = keyed_table(bq, dataset)
    keys = range(1, 51)
    changes(write, table, *((k, "0", "UPSERT", "1") for k in keys))
    ref = f"`{table.project}.{table.dataset_id}.{table.table_id}`"
    counts: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                bq.get_table(table.reference, timeout=10)
                query = bq.query(f"SELECT COUNT(*) AS n FROM {ref}", timeout=10)
                counts.append(int(next(iter(query.result(timeout=10))).n))
            except Exception as exc:
                failures.append(repr(exc))
                return

    def apply_changes() -> None:
        try:
            for sequence in range(2, 42):
                changes(
                    write,
                    table,
                    *((k, str(sequence), "UPSERT", format(sequence, "X")) for k in keys),
                    timeout=10,
                )
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=read, daemon=True) for _ in range(2)]
    writer = threading.Thread(target=apply_changes, daemon=True)
    for thread in threads:
        thread.start()
    writer.start()
    writer.join(timeout=60)
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
    assert not any(t.is_alive() for t in (writer, *threads)), (
        "a read or write hung while CDC changes were applied"
    )
    assert not failures, failures[:3]
    assert counts and set(counts) == {50}, f"reads saw a half-applied change: {sorted(set(counts))}"
    assert state(bq, table) == [(k, "41") for k in keys]


def test_a_long_query_does_not_hold_up_table_reads_or_appends(
    bq: bigquery.Client, dataset: str, write: Any
) -> None:
    """BigQuery runs queries beside the writes: a query scanning for seconds delays no tables.get and no append (the
    stock server runs a query on its REST event loop, holding its DuckDB connection, until it returns)."""
    bq.query(
        f"CREATE TABLE {dataset}.numbers AS SELECT x AS id FROM UNNEST(GENERATE_ARRAY(1, 12000)) AS x"
    ).result(timeout=60)
    table = keyed_table(bq, dataset)
    finished = threading.Event()
    counted: list[int] = []

    def long_query() -> None:  # 144 million pairs: seconds of DuckDB on this machine
        job = bq.query(
            f"SELECT COUNT(*) AS c FROM {dataset}.numbers AS a CROSS JOIN {dataset}.numbers AS b "
            "WHERE MOD(a.id * b.id, 7) = 3",
            timeout=120,
        )
        counted.extend(row.c for row in job.result(timeout=120))
        finished.set()

    query = threading.Thread(target=long_query)
    query.start()
    try:
        time.sleep(0.5)  # the query is running at the server
        assert bq.get_table(table.reference, timeout=60).table_id == table.table_id
        changes(write, table, (1, "written during the query", "UPSERT", "1"))
        assert not finished.is_set(), "the read and the append waited for the query"
    finally:
        query.join(timeout=120)
    per_residue = [sum(1 for i in range(1, 12001) if i % 7 == r) for r in range(7)]
    assert counted == [
        sum(per_residue[a] * per_residue[b] for a in range(7) for b in range(7) if a * b % 7 == 3)
    ]
    assert state(bq, table) == [(1, "written during the query")]
