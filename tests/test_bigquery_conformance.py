"""The local BigQuery API server behaves as real BigQuery documents, where our loader depends on it.

Each test states BigQuery's documented behaviour and fails on stock bqemulator 1.4.0 (proven by
`test_bigquery_conformance_fails_on_stock.py`, which runs this module against the unpatched server).
References: https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/insert (409 duplicate job id),
https://cloud.google.com/bigquery/docs/loading-data-cloud-storage-parquet (Parquet schema by name,
schemaUpdateOptions, partition decorators), https://cloud.google.com/bigquery/docs/managing-partitioned-table-data
(writing to a partition with `table$YYYYMMDD`).
"""

from __future__ import annotations

import datetime as dt
import io
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.api_core import exceptions
from google.cloud import bigquery

from local_stack.bigquery_emulator import BigQueryEmulatorServer


def parquet_bytes(table: pa.Table) -> io.BytesIO:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    buffer.seek(0)
    return buffer


def load_parquet(
    bq: bigquery.Client,
    destination: str,
    table: pa.Table,
    *,
    job_id: str | None = None,
    write_disposition: str = bigquery.WriteDisposition.WRITE_APPEND,
    schema_update_options: list[str] | None = None,
) -> bigquery.LoadJob:
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        write_disposition=write_disposition,
        schema_update_options=schema_update_options or [],
    )
    job = bq.load_table_from_file(parquet_bytes(table), destination, job_config=config, job_id=job_id)
    job.result()
    return job


def rows(bq: bigquery.Client, table: str, order_by: str = "id") -> list[dict[str, object]]:
    return [dict(row.items()) for row in bq.query(f"SELECT * FROM `{table}` ORDER BY {order_by}").result()]


def make_table(
    bq: bigquery.Client, table_id: str, schema: list[bigquery.SchemaField], **options: object
) -> None:
    table = bigquery.Table(table_id, schema=schema)
    for key, value in options.items():
        setattr(table, key, value)
    bq.create_table(table)


# -- job ids ---------------------------------------------------------------------------------------------------


def test_duplicate_query_job_id_is_rejected_with_409(bq: bigquery.Client) -> None:
    job_id = f"q_{uuid.uuid4().hex}"
    bq.query("SELECT 1", job_id=job_id, job_retry=None).result()
    with pytest.raises(exceptions.Conflict):
        bq.query("SELECT 2", job_id=job_id, job_retry=None).result()


def test_duplicate_load_job_id_is_rejected_and_rows_are_not_doubled(
    bq: bigquery.Client, dataset: str
) -> None:
    destination = f"{bq.project}.{dataset}.events"
    make_table(bq, destination, [bigquery.SchemaField("id", "INT64")])
    job_id = f"load_{uuid.uuid4().hex}"
    data = pa.table({"id": [1, 2, 3]})
    load_parquet(bq, destination, data, job_id=job_id)
    with pytest.raises(exceptions.Conflict):
        load_parquet(bq, destination, data, job_id=job_id)
    assert [r["id"] for r in rows(bq, destination)] == [1, 2, 3]


def test_uploaded_load_keeps_the_client_job_id_and_get_job_finds_it(
    bq: bigquery.Client, dataset: str
) -> None:
    destination = f"{bq.project}.{dataset}.events"
    make_table(bq, destination, [bigquery.SchemaField("id", "INT64")])
    job_id = f"load_{uuid.uuid4().hex}"
    job = load_parquet(bq, destination, pa.table({"id": [1]}), job_id=job_id)
    assert job.job_id == job_id
    fetched = bq.get_job(job_id)
    assert fetched.state == "DONE" and fetched.error_result is None
    assert isinstance(fetched, bigquery.LoadJob)


def test_failed_load_keeps_its_id_taken_and_get_job_reports_the_error(
    bq: bigquery.Client, dataset: str
) -> None:
    destination = f"{bq.project}.{dataset}.events"
    make_table(bq, destination, [bigquery.SchemaField("id", "INT64")])
    job_id = f"load_{uuid.uuid4().hex}"
    with pytest.raises(exceptions.GoogleAPIError):
        load_parquet(bq, destination, pa.table({"id": ["not a number"]}), job_id=job_id)
    fetched = bq.get_job(job_id)
    assert fetched.state == "DONE" and fetched.error_result is not None
    with pytest.raises(exceptions.Conflict):  # a failed job's id cannot be re-run: retry needs a new id
        load_parquet(bq, destination, pa.table({"id": [1]}), job_id=job_id)


# -- Parquet schema --------------------------------------------------------------------------------------------


def test_parquet_columns_are_matched_by_name_not_position(bq: bigquery.Client, dataset: str) -> None:
    destination = f"{bq.project}.{dataset}.players"
    make_table(
        bq,
        destination,
        [
            bigquery.SchemaField("id", "INT64"),
            bigquery.SchemaField("nick", "STRING"),
            bigquery.SchemaField("level", "INT64"),
        ],
    )
    load_parquet(bq, destination, pa.table({"level": [7], "nick": ["ace"], "id": [1]}))
    assert rows(bq, destination) == [{"id": 1, "nick": "ace", "level": 7}]


def test_parquet_load_creates_a_missing_table_from_the_file_schema(bq: bigquery.Client, dataset: str) -> None:
    destination = f"{bq.project}.{dataset}.created_by_load"
    data = pa.table(
        {
            "id": pa.array([1], pa.int64()),
            "amount": pa.array([1.5], pa.float64()),
            "nick": pa.array(["é🎰"], pa.string()),
            "at": pa.array([dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)], pa.timestamp("us", tz="UTC")),
        }
    )
    load_parquet(bq, destination, data)
    schema = {field.name: field.field_type for field in bq.get_table(destination).schema}
    assert schema == {"id": "INTEGER", "amount": "FLOAT", "nick": "STRING", "at": "TIMESTAMP"}
    assert rows(bq, destination)[0]["nick"] == "é🎰"


def test_extra_parquet_column_is_rejected_without_field_addition(bq: bigquery.Client, dataset: str) -> None:
    destination = f"{bq.project}.{dataset}.players"
    make_table(bq, destination, [bigquery.SchemaField("id", "INT64")])
    with pytest.raises(exceptions.GoogleAPIError, match=r"(?i)field"):
        load_parquet(bq, destination, pa.table({"id": [1], "country": ["KR"]}))
    assert [field.name for field in bq.get_table(destination).schema] == ["id"]
    assert rows(bq, destination) == []


def test_allow_field_addition_adds_the_new_column(bq: bigquery.Client, dataset: str) -> None:
    destination = f"{bq.project}.{dataset}.players"
    make_table(bq, destination, [bigquery.SchemaField("id", "INT64")])
    load_parquet(bq, destination, pa.table({"id": [1]}))
    load_parquet(
        bq,
        destination,
        pa.table({"id": [2], "country": ["KR"]}),
        schema_update_options=[bigquery.SchemaUpdateOption.ALLOW_FIELD_ADDITION],
    )
    table = bq.get_table(destination)
    assert [(f.name, f.mode) for f in table.schema] == [("id", "NULLABLE"), ("country", "NULLABLE")]
    assert table.schema[1].field_type == "STRING"
    assert rows(bq, destination) == [{"id": 1, "country": None}, {"id": 2, "country": "KR"}]


def test_a_column_added_by_updating_the_schema_can_be_written_and_read(
    bq: bigquery.Client, dataset: str
) -> None:
    # https://cloud.google.com/bigquery/docs/managing-table-schemas#add_an_empty_column (tables.patch)
    destination = f"{bq.project}.{dataset}.wallets"
    make_table(bq, destination, [bigquery.SchemaField("id", "INT64")])
    load_parquet(bq, destination, pa.table({"id": [1]}))
    table = bq.get_table(destination)
    table.schema = [*table.schema, bigquery.SchemaField("note", "STRING")]
    bq.update_table(table, ["schema"])
    bq.query(f"INSERT INTO `{destination}` (id, note) VALUES (2, 'added')").result()
    assert rows(bq, destination) == [{"id": 1, "note": None}, {"id": 2, "note": "added"}]


# -- partition decorators --------------------------------------------------------------------------------------


def _partitioned(bq: bigquery.Client, dataset: str) -> str:
    destination = f"{bq.project}.{dataset}.changes"
    make_table(
        bq,
        destination,
        [bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("at", "TIMESTAMP")],
        time_partitioning=bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY, field="at"),
    )
    return destination


def _at(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, tzinfo=dt.UTC)


def _changes(ids: list[int], days: list[int]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "at": pa.array([_at(d) for d in days], pa.timestamp("us", tz="UTC")),
        }
    )


def test_write_truncate_into_a_partition_decorator_replaces_only_that_day(
    bq: bigquery.Client, dataset: str
) -> None:
    destination = _partitioned(bq, dataset)
    load_parquet(bq, destination, _changes([1, 2, 3], [23, 24, 25]))
    load_parquet(
        bq, destination + "$20261124", _changes([20, 21], [24, 24]), write_disposition="WRITE_TRUNCATE"
    )
    assert [r["id"] for r in rows(bq, destination)] == [1, 3, 20, 21]


def test_a_partition_decorator_rejects_rows_of_other_days(bq: bigquery.Client, dataset: str) -> None:
    destination = _partitioned(bq, dataset)
    load_parquet(bq, destination, _changes([1], [24]))
    with pytest.raises(exceptions.GoogleAPIError, match=r"(?i)partition"):
        load_parquet(
            bq, destination + "$20261124", _changes([20, 21], [24, 25]), write_disposition="WRITE_TRUNCATE"
        )
    assert [r["id"] for r in rows(bq, destination)] == [1]


# -- atomicity -------------------------------------------------------------------------------------------------


def test_a_failed_write_truncate_load_leaves_the_table_unchanged(bq: bigquery.Client, dataset: str) -> None:
    destination = f"{bq.project}.{dataset}.balances"
    make_table(
        bq, destination, [bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("amount", "NUMERIC")]
    )
    load_parquet(bq, destination, pa.table({"id": [1, 2], "amount": pa.array([1, 2], pa.int64())}))
    with pytest.raises(exceptions.GoogleAPIError):
        load_parquet(
            bq,
            destination,
            pa.table({"id": ["x"], "amount": ["not numeric"]}),
            write_disposition="WRITE_TRUNCATE",
        )
    assert [r["id"] for r in rows(bq, destination)] == [1, 2]


# -- memory: no whole-table copy per write ---------------------------------------------------------------------


def _footprint_bytes(server: BigQueryEmulatorServer) -> int:
    """Resident memory of the server plus the size of its data folder."""
    pid = server.process.pid()
    assert pid is not None
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    disk = sum(path.stat().st_size for path in (server.root / "data").rglob("*") if path.is_file())
    return rss + disk


def test_small_loads_into_a_large_table_do_not_copy_the_table(
    bq: bigquery.Client, dataset: str, bigquery_server: BigQueryEmulatorServer
) -> None:
    """A write costs what it writes; the emulator must not copy the whole table on each one."""
    destination = f"{bq.project}.{dataset}.big"
    n = 200_000
    payloads = [os.urandom(32).hex() for _ in range(n)]  # incompressible, so a copy really costs memory/disk
    make_table(
        bq, destination, [bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("payload", "STRING")]
    )
    load_parquet(bq, destination, pa.table({"id": pa.array(range(n), pa.int64()), "payload": payloads}))
    before = _footprint_bytes(bigquery_server)
    for i in range(15):
        load_parquet(bq, destination, pa.table({"id": [n + i], "payload": ["y"]}))
    growth = _footprint_bytes(bigquery_server) - before
    table_bytes = n * (64 + 8)
    # 15 copies of the ~14 MB table cost ~200 MB (measured on stock 1.4.0); in-place writes cost ~nothing.
    assert growth < table_bytes, f"memory + disk grew by {growth / 1e6:.0f} MB over 15 one-row loads"
    assert next(iter(bq.query(f"SELECT COUNT(*) AS n FROM `{destination}`").result())).n == n + 15


def test_bignumeric_columns_hold_76_digits_exactly(bq: bigquery.Client, dataset: str) -> None:
    """BIGNUMERIC: 38 digits before and 38 after the point, exact (a Parquet decimal256 loads into it); the stock
    server cannot even create the column (DuckDB's DECIMAL stops at 38 digits)."""
    from decimal import Decimal

    destination = f"{bq.project}.{dataset}.wide"
    make_table(
        bq, destination, [bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("w", "BIGNUMERIC")]
    )
    values = [
        Decimal("12345678901234567890123456789012345678.12345678901234567890123456789012345678"),
        Decimal("-0.00000000000000000000000000000000000001"),
        Decimal("0"),
        None,
    ]
    load_parquet(
        bq,
        destination,
        pa.table({"id": list(range(len(values))), "w": pa.array(values, pa.decimal256(76, 38))}),
    )
    loaded = [None if r["w"] is None else Decimal(str(r["w"])) for r in rows(bq, destination)]
    assert loaded == values
    assert bq.get_table(destination).schema[1].field_type == "BIGNUMERIC"
