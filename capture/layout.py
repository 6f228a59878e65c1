"""Where DMS puts files in S3, and what the columns it adds are called: shared by the capture and the sensor.

`[prefix/]schema/table/LOAD0000000A.parquet`  - full load, hexadecimal counter (DMS: LOAD00000001 ... 0000000A)
`[prefix/]schema/table/[YYYY/MM/DD/]20261125-1134010000.parquet` - CDC file named by its write time (DMS format
`yyyyMMdd-HHmmss` + 4 sub-second digits); date folders with DatePartitionEnabled (sequence YYYYMMDD, delimiter
SLASH). Columns: `Op` first (I/U/D; DMS IncludeOpForFullLoad), the commit timestamp (DMS TimestampColumnName,
string `yyyy-MM-dd HH:mm:ss.SSSSSS`), the source columns, then the change sequence (a DMS `add-column`
transformation of `$AR_H_CHANGE_SEQ`).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from urllib.parse import unquote_plus

OP_COLUMN = "Op"
COMMIT_TIMESTAMP_COLUMN = "cdc_commit_timestamp"
CHANGE_SEQUENCE_COLUMN = "cdc_change_seq"
ADDED_COLUMNS = (OP_COLUMN, COMMIT_TIMESTAMP_COLUMN, CHANGE_SEQUENCE_COLUMN)
COMMIT_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

_LOAD_NAME = re.compile(r"^LOAD(?P<n>[0-9A-F]{8})\.parquet$")
_CDC_NAME = re.compile(r"^(?P<date>\d{8})-(?P<time>\d{6})(?P<frac>\d{4})(?:-(?P<n>\d+))?\.parquet$")


def commit_timestamp_text(when: dt.datetime) -> str:
    return (
        when.astimezone(dt.UTC).strftime(COMMIT_TIMESTAMP_FORMAT)
        if when.tzinfo
        else when.strftime(COMMIT_TIMESTAMP_FORMAT)
    )


def load_file_key(prefix: str, schema: str, table: str, number: int) -> str:
    return _join(prefix, schema, table, f"LOAD{number:08X}.parquet")


def load_file_number(name: str) -> int | None:
    """The counter of a full-load file name (LOAD0000000A.parquet -> 10); None for any other name."""
    match = _LOAD_NAME.match(name)
    return int(match["n"], 16) if match else None


def cdc_file_key(
    prefix: str, schema: str, table: str, written: dt.datetime, date_folders: bool, suffix: int = 0
) -> str:
    written = written.astimezone(dt.UTC)
    name = written.strftime("%Y%m%d-%H%M%S") + f"{written.microsecond // 100:04d}"
    name += f"-{suffix}" if suffix else ""
    folders = [written.strftime("%Y"), written.strftime("%m"), written.strftime("%d")] if date_folders else []
    return _join(prefix, schema, table, *folders, name + ".parquet")


def table_prefix(prefix: str, schema: str, table: str) -> str:
    return _join(prefix, schema, table) + "/"


def _join(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


@dataclass(frozen=True)
class LandedFile:
    """What a landing key says: which table, full load or CDC, and the day of a CDC file."""

    key: str
    schema: str
    table: str
    kind: str  # "load" or "cdc"
    day: dt.date | None  # UTC day a CDC file was written; None for full-load files


class NotALandingFile(ValueError):
    """A key under the landing prefix that is not a DMS data file; the message says why."""


def parse_key(raw_key: str, prefix: str) -> LandedFile:
    """Parse an S3 key (URL-encoded as in S3 event messages, or plain) into what it carries."""
    key = unquote_plus(raw_key)
    root = prefix.strip("/")
    if root and not key.startswith(root + "/"):
        raise NotALandingFile(f"{key}: not under the landing prefix {root}/")
    parts = key[len(root) + 1 :].split("/") if root else key.split("/")
    if len(parts) not in (3, 6):
        raise NotALandingFile(
            f"{key}: expected {root}/<schema>/<table>/<file>.parquet or .../<YYYY>/<MM>/<DD>/<file>.parquet"
        )
    schema, table, name = parts[0], parts[1], parts[-1]
    if _LOAD_NAME.match(name):
        if len(parts) != 3:
            raise NotALandingFile(f"{key}: full-load files are not in date folders")
        return LandedFile(key, schema, table, "load", None)
    cdc = _CDC_NAME.match(name)
    if not cdc:
        raise NotALandingFile(f"{key}: {name} is neither a DMS full-load nor a CDC Parquet file name")
    day = dt.datetime.strptime(cdc["date"], "%Y%m%d").date()
    if len(parts) == 6 and (parts[2], parts[3], parts[4]) != (f"{day:%Y}", f"{day:%m}", f"{day:%d}"):
        raise NotALandingFile(f"{key}: date folders {'/'.join(parts[2:5])} do not match the file name {name}")
    return LandedFile(key, schema, table, "cdc", day)
