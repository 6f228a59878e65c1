"""The local BigQuery server's time per call of a streaming load, on a quiet server: tables.get, a CDC append
(UPSERT proto rows on a keyed table's default stream) and an Arrow append. Every write holds the server's one write
lock, so these times bound how many tables a load run writes per second (docs/local-stack.md, "Write speed"). Compare
two versions by running this from each tree, one after the other.

    python -m bench.bigquery_write_bench [--tables 10] [--rows 30] [--appends 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import types

from cdc.clients import bigquery_client, bigquery_write_client
from cdc_assets.proto_rows import ProtoRows
from local_stack.bigquery_emulator import BigQueryEmulatorServer
from local_stack.processes import free_port

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = 12


def _append(write: Any, table: str, request: types.AppendRowsRequest) -> None:
    request.write_stream = f"projects/p/datasets/d/tables/{table}/streams/_default"
    for response in write.append_rows(iter([request])):
        if response.error.code:
            raise RuntimeError(f"{table}: {response.error.message}")


def _timed(calls: int, call: Callable[[int], object], threads: int = 1) -> dict[str, float]:
    """Each call's time (p50, max) and the calls per second, `threads` calling at once (as a load run's threads do)."""
    seconds: list[float] = []

    def timed(index: int) -> None:
        started = time.perf_counter()
        call(index)
        seconds.append(time.perf_counter() - started)

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(timed, range(calls)))
    return {
        "p50_ms": round(statistics.median(seconds) * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
        "calls_per_s": round(calls / (time.perf_counter() - began), 1),
    }


def run(tables: int, rows: int, appends: int, threads: int = 1) -> dict[str, Any]:
    schema = [bigquery.SchemaField("id", "INTEGER")]
    schema += [bigquery.SchemaField(f"c{i}", "STRING") for i in range(COLUMNS)]
    proto = ProtoRows(schema)
    with tempfile.TemporaryDirectory(prefix="bq-write-bench-") as root:
        server = BigQueryEmulatorServer(
            rest_port=free_port(), grpc_port=free_port(), project="p", root=Path(root)
        )
        server.start()
        try:
            bq = bigquery_client("p", endpoint=server.endpoint)
            write = bigquery_write_client(server.write_endpoint)
            bq.create_dataset("d")
            for index in range(tables):
                keyed = bigquery.Table(f"p.d.current_{index}", schema=schema)
                keyed.table_constraints = bigquery.table.TableConstraints(
                    primary_key=bigquery.table.PrimaryKey(columns=["id"]), foreign_keys=None
                )
                bq.create_table(keyed)
                bq.create_table(bigquery.Table(f"p.d.log_{index}", schema=schema))

            def data(index: int, first_id: int) -> pa.Table:
                values = {f"c{i}": pa.array([f"value {index}"] * rows) for i in range(COLUMNS)}
                return pa.table({"id": pa.array(range(first_id, first_id + rows), pa.int64()), **values})

            def cdc_append(index: int) -> None:
                # half of each append's keys were written by the one before: updates and inserts
                request = types.AppendRowsRequest()
                sequences = [str(index * rows + k + 1) for k in range(rows)]
                request.proto_rows = types.AppendRowsRequest.ProtoData(
                    writer_schema=types.ProtoSchema(proto_descriptor=proto.descriptor),
                    rows=types.ProtoRows(
                        serialized_rows=proto.encode(
                            data(index, index * rows // 2), ["UPSERT"] * rows, sequences
                        )
                    ),
                )
                _append(write, f"current_{index % tables}", request)

            def arrow_append(index: int) -> None:
                batch = data(index, 0)
                request = types.AppendRowsRequest()
                request.arrow_rows = types.AppendRowsRequest.ArrowData(
                    writer_schema=types.ArrowSchema(serialized_schema=batch.schema.serialize().to_pybytes()),
                    rows=types.ArrowRecordBatch(
                        serialized_record_batch=batch.to_batches()[0].serialize().to_pybytes()
                    ),
                )
                _append(write, f"log_{index % tables}", request)

            return {
                "tables": tables,
                "rows_per_append": rows,
                "appends": appends,
                "threads": threads,
                "get_table": _timed(appends, lambda i: bq.get_table(f"p.d.current_{i % tables}"), threads),
                "cdc_append": _timed(appends, cdc_append, threads),
                "arrow_append": _timed(appends, arrow_append, threads),
            }
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tables", type=int, default=10)
    parser.add_argument("--rows", type=int, default=30, help="rows per append")
    parser.add_argument("--appends", type=int, default=60, help="calls of each kind")
    parser.add_argument("--threads", type=int, default=1, help="callers at once (a load run has up to 24)")
    args = parser.parse_args()
    report = run(args.tables, args.rows, args.appends, args.threads)
    print(
        f"local BigQuery server, {args.tables} tables, {args.rows} rows per append, {args.appends} calls each, "
        f"{args.threads} caller(s) at once"
    )
    for name in ("get_table", "cdc_append", "arrow_append"):
        timed = report[name]
        print(
            f"  {name:14s} p50 {timed['p50_ms']:7.1f} ms   max {timed['max_ms']:7.1f} ms   "
            f"{timed['calls_per_s']:6.1f} calls/s"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bigquery-write.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
