"""A batch of landed files read from S3 into one Arrow table, with the changelog's metadata columns, in the types
BigQuery holds the source values in exactly (uint64 -> NUMERIC, wide decimals -> BIGNUMERIC, or STRING beyond its
38 integer digits, ints -> INT64).
Shared by both load modes; a file that is not a readable DMS Parquet file is named with what to do."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cdc.landing import (
    ADDED_COLUMNS,
    CHANGE_SEQUENCE_COLUMN,
    COMMIT_TIMESTAMP_COLUMN,
    OP_COLUMN,
    TRUNCATE_OP,
)
from cdc_assets.targets import CHANGE_SEQ, COMMIT_TS, LOADED_AT, OP, SOURCE_FILE, LoadError


def bigquery_type(arrow_type: pa.DataType) -> pa.DataType:
    """The Arrow type a column is loaded as, so that BigQuery holds the source value exactly."""
    if pa.types.is_uint64(arrow_type):
        return pa.decimal128(20, 0)  # NUMERIC: BIGINT UNSIGNED does not fit INT64
    if pa.types.is_integer(arrow_type):
        return pa.int64()
    if pa.types.is_floating(arrow_type):
        return pa.float64()
    if pa.types.is_decimal(arrow_type):
        precision, scale = arrow_type.precision, arrow_type.scale
        if precision - scale <= 29 and scale <= 9:
            return pa.decimal128(38, 9)  # NUMERIC
        if precision - scale <= 38 and scale <= 38:
            return pa.decimal256(76, 38)  # BIGNUMERIC
        return pa.string()  # beyond BIGNUMERIC (e.g. DECIMAL(65,10)): its exact digits as text
    return arrow_type


def read_landed(
    s3: Any,
    bucket: str,
    keys: list[str],
    sizes: list[int] | None = None,
    unreadable: dict[str, str] | None = None,
    on_file: Callable[[int], None] | None = None,
    versions: dict[str, str] | None = None,
    rest: list[str] | None = None,
) -> pa.Table | None:
    """Every row of the files, with the changelog's metadata columns, in BigQuery-loadable types (None: no
    readable file). File sizes in bytes are appended to `sizes` when given. A file that is not a readable DMS
    Parquet file raises LoadError, or, with `unreadable` given, is recorded there (key -> reason) and skipped.
    `on_file` is called with each readable file's row count (progress of a backfill). `versions` receives each
    file's ETag (its content identity: a key written again with other rows is another batch).

    Files in key order whose column types cannot join the earlier files' (an incompatible type change at the source
    between them) end the table: with `rest` given, the keys from the first such file on are appended there and
    left out (load the table, then the rest, whose type change the loader names); without, LoadError."""
    parts: list[tuple[str, pa.Table]] = []
    for key, body, etag in _fetched(s3, bucket, keys):
        if versions is not None:
            versions[key] = etag
        if sizes is not None:
            sizes.append(len(body))
        try:
            try:
                table = pq.read_table(io.BytesIO(body))
            except Exception as exc:
                raise LoadError(
                    f"s3://{bucket}/{key}: not a readable Parquet file ({exc}); it is left unloaded"
                ) from exc
            parts.append((key, with_metadata(table, key)))
            if on_file is not None:
                on_file(table.num_rows)
        except LoadError as exc:
            if unreadable is None:
                raise
            unreadable[key] = str(exc)
    if not parts:
        return None
    joined, changed = _joinable(parts)
    if joined < len(parts):
        if rest is None:
            raise LoadError(
                f"s3://{bucket}/{parts[joined][0]}: {changed} differs from the earlier files of this batch (an "
                "incompatible type change at the source): load the files before it on their own first"
            )
        rest.extend(k for k, _ in parts[joined:])
    return pa.concat_tables([table for _, table in parts[:joined]], promote_options="permissive")


FETCH_THREADS = 4  # files of one batch downloaded at once (a GET mostly waits; the local S3 is one process)


def _fetched(s3: Any, bucket: str, keys: list[str]) -> Iterator[tuple[str, bytes, str]]:
    """(key, body, ETag) of each file, in the keys' order; up to FETCH_THREADS downloaded at once (boto3's
    clients are thread-safe), a few files ahead of the one being read."""

    def fetch(key: str) -> tuple[str, bytes, str]:
        response = s3.get_object(Bucket=bucket, Key=key)
        return key, response["Body"].read(), str(response.get("ETag", "")).strip('"')

    if len(keys) < 2:
        yield from map(fetch, keys)
        return
    ahead = iter(keys)
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(keys))) as pool:
        fetching = deque(pool.submit(fetch, key) for key in itertools.islice(ahead, 2 * FETCH_THREADS))
        while fetching:
            done = fetching.popleft().result()
            following = next(ahead, None)
            if following is not None:
                fetching.append(pool.submit(fetch, following))
            yield done


def _joinable(parts: list[tuple[str, pa.Table]]) -> tuple[int, str]:
    """How many of the files, from the first, have column types one table can hold; and what stops the next."""
    schema = parts[0][1].schema
    for index, (_, table) in enumerate(parts[1:], 1):
        try:
            schema = pa.unify_schemas([schema, table.schema], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            changed = [
                f"column {f.name} ({schema.field(f.name).type} -> {f.type})"
                for f in table.schema
                if f.name in schema.names and schema.field(f.name).type != f.type
            ]
            return index, ", ".join(changed) or "a column's type"
    return len(parts), ""


def with_metadata(table: pa.Table, key: str) -> pa.Table:
    """One landed file's rows as changelog rows: Op, commit time (UTC), change sequence, file, load time, data."""
    names = table.column_names
    op = table[OP_COLUMN] if OP_COLUMN in names else pa.array(["I"] * table.num_rows)  # DMS full load
    if COMMIT_TIMESTAMP_COLUMN not in names or CHANGE_SEQUENCE_COLUMN not in names:
        raise LoadError(
            f"{key}: missing {COMMIT_TIMESTAMP_COLUMN} or {CHANGE_SEQUENCE_COLUMN}; render the DMS task with "
            "`cdc dms render` (it adds both)"
        )
    commit = table[COMMIT_TIMESTAMP_COLUMN].cast(pa.timestamp("us"))  # "yyyy-MM-dd HH:mm:ss.SSSSSS", UTC
    columns = {
        OP: op,
        COMMIT_TS: pc.assume_timezone(commit, "UTC"),
        CHANGE_SEQ: table[CHANGE_SEQUENCE_COLUMN],
        SOURCE_FILE: pa.array([key] * table.num_rows, pa.string()),
        LOADED_AT: pa.array([dt.datetime.now(dt.UTC)] * table.num_rows, pa.timestamp("us", tz="UTC")),
    }
    for name in names:
        if name not in ADDED_COLUMNS:
            column = table[name]
            wanted = bigquery_type(column.type)
            if pa.types.is_decimal(column.type) and pa.types.is_string(wanted):
                # plain digits (Arrow's own cast writes exponents, e.g. '1.0000E-10')
                text = [None if v is None else format(v, "f") for v in column.to_pylist()]
                columns[name] = pa.array(text, wanted)
            else:
                columns[name] = column.cast(wanted)
    return pa.table(columns)


def truncated_at(data: pa.Table) -> str | None:
    """The change sequence of the batch's last TRUNCATE of the table (the capture's Op T row), if any."""
    truncates = data.filter(pc.equal(data[OP], TRUNCATE_OP))
    return str(pc.max(truncates[CHANGE_SEQ]).as_py()) if truncates.num_rows else None


def batch_id(keys: list[str], versions: dict[str, str] | None = None) -> str:
    """The batch's identity: its files, and with `versions` their contents (S3 ETags), so that a key written again
    with other rows (a capture reset or a DMS table reload rewrites LOAD00000001.parquet) is a new batch."""
    versions = versions or {}
    return hashlib.sha256(
        "\n".join(f"{key} {versions.get(key, '')}".rstrip() for key in sorted(keys)).encode()
    ).hexdigest()[:20]
