"""Changes as protobuf rows for BigQuery's Storage Write API (native CDC takes protobuf only): a descriptor built from
the table's BigQuery schema plus `_CHANGE_TYPE` and `_CHANGE_SEQUENCE_NUMBER`, and each Arrow row encoded in the
wire form BigQuery documents per type (TIMESTAMP as epoch microseconds, DATE as epoch days, NUMERIC/BIGNUMERIC and
DATETIME as text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import uuid4

import pyarrow as pa
import pyarrow.compute as pc
from google.cloud import bigquery
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHANGE_TYPE, CHANGE_SEQUENCE = "_CHANGE_TYPE", "_CHANGE_SEQUENCE_NUMBER"
_T = descriptor_pb2.FieldDescriptorProto
PROTO_TYPES = {
    "INTEGER": _T.TYPE_INT64,
    "INT64": _T.TYPE_INT64,
    "FLOAT": _T.TYPE_DOUBLE,
    "FLOAT64": _T.TYPE_DOUBLE,
    "BOOLEAN": _T.TYPE_BOOL,
    "BOOL": _T.TYPE_BOOL,
    "STRING": _T.TYPE_STRING,
    "JSON": _T.TYPE_STRING,
    "BYTES": _T.TYPE_BYTES,
    "NUMERIC": _T.TYPE_STRING,
    "BIGNUMERIC": _T.TYPE_STRING,
    "TIMESTAMP": _T.TYPE_INT64,
    "DATE": _T.TYPE_INT32,
    "DATETIME": _T.TYPE_STRING,
    "TIME": _T.TYPE_STRING,
}


def change_sequence_number(sequence: str) -> str:
    """`_CHANGE_SEQUENCE_NUMBER` of a change sequence: a 35-digit decimal does not fit one 16-hex-digit section;
    split into 19 + 16 digits, each in hex, its order is kept (BigQuery compares sections as unsigned numbers)."""
    if not sequence.isdigit() or len(sequence) > 35:
        raise ValueError(f"change sequence {sequence!r} is not a number of up to 35 digits")
    digits = sequence.rjust(35, "0")
    return f"{int(digits[:19]):X}/{int(digits[19:]):X}"


class ProtoRows:
    """The writer schema of one table (its columns, in the table's types, and the CDC pseudo-columns) and the
    encoding of rows into it."""

    def __init__(self, fields: Sequence[bigquery.SchemaField], change_columns: bool = True):
        self.fields = [f for f in fields if f.mode != "REPEATED"]
        descriptor = descriptor_pb2.DescriptorProto(name="CdcRow")
        names = [(f.name, f.field_type) for f in self.fields]
        if change_columns:
            names += [(CHANGE_TYPE, "STRING"), (CHANGE_SEQUENCE, "STRING")]
        for number, (name, field_type) in enumerate(names, start=1):
            if field_type not in PROTO_TYPES:
                raise ValueError(
                    f"column {name}: BigQuery type {field_type} has no Storage Write API encoding here"
                )
            descriptor.field.add(
                name=name, number=number, type=PROTO_TYPES[field_type], label=_T.LABEL_OPTIONAL
            )
        self.descriptor = descriptor
        file_proto = descriptor_pb2.FileDescriptorProto(name=f"cdc_{uuid4().hex}.proto", syntax="proto2")
        file_proto.message_type.add().CopyFrom(descriptor)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(file_proto)
        self.message_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("CdcRow"))

    def encode(
        self,
        table: pa.Table,
        change_types: Sequence[str] | None = None,
        sequences: Sequence[str] | None = None,
    ) -> list[bytes]:
        """Serialized rows of `table` (columns by name; a column the table lacks is NULL), with each row's change type
        and change sequence number when given."""
        columns: list[tuple[str, list[Any]]] = []
        for field in self.fields:
            if field.name in table.column_names:
                columns.append((field.name, _wire_values(table[field.name], field.field_type)))
        if change_types is not None and sequences is not None:
            columns.append((CHANGE_TYPE, list(change_types)))
            columns.append((CHANGE_SEQUENCE, [change_sequence_number(s) for s in sequences]))
        cls = self.message_class
        names = [name for name, _ in columns]
        rows = []
        for values in zip(*(values for _, values in columns), strict=True):
            rows.append(
                cls(**{n: v for n, v in zip(names, values, strict=True) if v is not None}).SerializeToString()
            )
        return rows


def _wire_values(column: Any, field_type: str) -> list[Any]:
    """A column's values as the Storage Write API takes them for `field_type`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if field_type == "TIMESTAMP" and pa.types.is_timestamp(kind):
        return column.cast(pa.timestamp("us", tz=kind.tz)).cast(pa.int64()).to_pylist()  # epoch microseconds
    if field_type == "DATE" and pa.types.is_date32(kind):
        return column.cast(pa.int32()).to_pylist()  # epoch days
    if field_type == "DATETIME" and pa.types.is_timestamp(kind):
        return pc.strftime(column.cast(pa.timestamp("us")), format="%Y-%m-%d %H:%M:%S").to_pylist()
    if field_type in ("NUMERIC", "BIGNUMERIC") and pa.types.is_decimal(kind):
        return [None if v is None else format(v, "f") for v in column.to_pylist()]
    return column.to_pylist()
