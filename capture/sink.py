"""Per-table buffers of normalised changes, written as DMS-layout Parquet objects to S3.

A file is built completely in memory and stored with one PUT, so an object appears in S3 only complete and
its S3 event fires once. The schema comes from the table's column definitions, not from the values.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capture.columns import ColumnSpec
from cdc.landing import (
    CHANGE_SEQUENCE_COLUMN,
    COMMIT_TIMESTAMP_COLUMN,
    OP_COLUMN,
    ControlDocuments,
    cdc_file_key,
    load_file_number,
    table_prefix,
)


@dataclass
class TableBuffer:
    schema: str
    table: str
    columns: list[ColumnSpec]
    rows: list[tuple[Any, ...]] = field(default_factory=list)  # (op, commit_ts_text, *values, sequence)
    first_buffered: float | None = None  # when the oldest buffered row was buffered (epoch seconds)

    def arrow_schema(self) -> pa.Schema:
        fields = [pa.field(OP_COLUMN, pa.string(), nullable=False)]
        fields.append(pa.field(COMMIT_TIMESTAMP_COLUMN, pa.string()))
        # Every source column is nullable in the file, as DMS writes it: a zero date in a NOT NULL column is NULL.
        fields += [pa.field(c.name, c.arrow_type()) for c in self.columns]
        fields.append(pa.field(CHANGE_SEQUENCE_COLUMN, pa.string(), nullable=False))
        return pa.schema(fields)

    def to_arrow(self) -> pa.Table:
        schema = self.arrow_schema()
        columns: list[Any] = list(zip(*self.rows, strict=True)) if self.rows else [[] for _ in schema]
        arrays = []
        for index, schema_field in enumerate(schema):
            try:
                arrays.append(pa.array(columns[index], type=schema_field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise ValueError(
                    f"{self.schema}.{self.table}.{schema_field.name}: value does not fit {schema_field.type}: {exc}"
                ) from exc
        return pa.Table.from_arrays(arrays, schema=schema)


def parquet_bytes(table: pa.Table, metadata: dict[str, str]) -> bytes:
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buffer = io.BytesIO()
    pq.write_table(
        table, buffer, compression="snappy", coerce_timestamps="us", allow_truncated_timestamps=False
    )
    return buffer.getvalue()


class S3Store:
    """The capture's only output: data files under the landing prefix, checkpoints and status beside it."""

    def __init__(self, s3: Any, bucket: str, prefix: str):
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Checkpoints and status live outside the landing prefix (no S3 event), one folder per landing prefix.
        self.control = ControlDocuments(s3, bucket, self.prefix)
        self._last_cdc_key: dict[tuple[str, str], str] = {}

    def put_file(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)

    def cdc_key(self, schema: str, table: str, written: dt.datetime, date_folders: bool) -> str:
        suffix = 0
        key = cdc_file_key(self.prefix, schema, table, written, date_folders)
        while key == self._last_cdc_key.get((schema, table)) or (suffix and self._exists(key)):
            suffix += 1
            key = cdc_file_key(self.prefix, schema, table, written, date_folders, suffix)
        self._last_cdc_key[(schema, table)] = key
        return key

    def _exists(self, key: str) -> bool:
        return bool(self.s3.list_objects_v2(Bucket=self.bucket, Prefix=key).get("KeyCount"))

    def delete_load_files(self, schema: str, table: str) -> int:
        """Remove an earlier (possibly partial) full load of a table before a new one."""
        prefix = table_prefix(self.prefix, schema, table) + "LOAD"
        deleted = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
                deleted += len(keys)
        return deleted

    def last_load_number(self, schema: str, table: str) -> int:
        """The highest LOAD file counter of a table (0: none)."""
        prefix = table_prefix(self.prefix, schema, table) + "LOAD"
        numbers = [0]
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                number = load_file_number(item["Key"].rsplit("/", 1)[-1])
                if number is not None:
                    numbers.append(number)
        return max(numbers)

    def read_json(self, kind: str, cluster: str) -> dict[str, Any] | None:
        return self.control.read(kind, cluster)

    def write_json(self, kind: str, cluster: str, document: dict[str, Any]) -> None:
        self.control.write(kind, cluster, document)

    def delete_json(self, kind: str, cluster: str) -> None:
        self.control.delete(kind, cluster)
