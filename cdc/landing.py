"""The landing contract between the producer (our capture or AWS DMS) and the loader: where files land in S3, the
columns added to them, the S3 event messages that announce them, and the control documents kept beside them.

Layout:

`[prefix/]schema/table/LOAD0000000A.parquet`  - full load, hexadecimal counter (DMS: LOAD00000001 ... 0000000A)
`[prefix/]schema/table/[YYYY/MM/DD/]20261125-1134010000.parquet` - CDC file named by its write time (DMS format
`yyyyMMdd-HHmmss` + 4 sub-second digits); date folders with DatePartitionEnabled (sequence YYYYMMDD, delimiter
SLASH). Columns: `Op` first (I/U/D; DMS IncludeOpForFullLoad), the commit timestamp (DMS TimestampColumnName,
string `yyyy-MM-dd HH:mm:ss.SSSSSS`), the source columns, then the change sequence (a DMS `add-column`
transformation of `$AR_H_CHANGE_SEQ`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

OP_COLUMN = "Op"
COMMIT_TIMESTAMP_COLUMN = "cdc_commit_timestamp"
CHANGE_SEQUENCE_COLUMN = "cdc_change_seq"
ADDED_COLUMNS = (OP_COLUMN, COMMIT_TIMESTAMP_COLUMN, CHANGE_SEQUENCE_COLUMN)
# Op of a `TRUNCATE TABLE` at the source (our capture only; DMS writes nothing for it): a row with every source
# column NULL at the statement's change sequence - every row whose last change precedes it is gone
TRUNCATE_OP = "T"
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


# -- S3 event messages ---------------------------------------------------------------------------------------


@dataclass
class ParsedMessage:
    """An SQS message announcing landed files: its id, receipt handle and receive count, and the S3 keys in it."""

    message_id: str
    receipt_handle: str
    receive_count: int
    keys: list[str] = field(default_factory=list)
    test_event: bool = False


class PoisonMessage(ValueError):
    """A message that is not an S3 event notification; the text says why."""


def parse_message(message: dict[str, Any]) -> ParsedMessage:
    """An SQS message of an S3 event: an S3 event notification (plain, SNS-wrapped, or S3's TestEvent; keys are
    URL-decoded) or an EventBridge "Object Created" event (keys as they are: EventBridge does not encode them)."""
    parsed = ParsedMessage(
        message_id=message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        receive_count=int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
    )
    try:
        body = json.loads(message["Body"])
        if isinstance(body, dict) and body.get("Type") == "Notification" and "Message" in body:
            body = json.loads(body["Message"])  # SNS-wrapped
    except (ValueError, TypeError) as exc:
        raise PoisonMessage(f"message {parsed.message_id}: body is not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise PoisonMessage(f"message {parsed.message_id}: body is not an S3 event object")
    if body.get("Event") == "s3:TestEvent":
        parsed.test_event = True
        return parsed
    if body.get("source") == "aws.s3" and "detail-type" in body:
        return _parse_eventbridge(body, parsed)
    records = body.get("Records")
    if not isinstance(records, list):
        raise PoisonMessage(
            f"message {parsed.message_id}: neither an S3 event notification (no 'Records') nor an EventBridge "
            "S3 event (source 'aws.s3'); point only the landing bucket's events at this queue"
        )
    for record in records:
        try:
            if str(record["eventName"]).startswith("ObjectCreated"):
                parsed.keys.append(unquote_plus(record["s3"]["object"]["key"]))
        except (KeyError, TypeError) as exc:
            raise PoisonMessage(f"message {parsed.message_id}: malformed S3 event record ({exc})") from exc
    return parsed


def _parse_eventbridge(body: dict[str, Any], parsed: ParsedMessage) -> ParsedMessage:
    """`{"detail-type": "Object Created", "source": "aws.s3", "detail": {"object": {"key": ...}}}`, delivered by an
    EventBridge rule; other S3 detail types (deletions, restores) name no new file."""
    if body["detail-type"] != "Object Created":
        return parsed
    try:
        key = body["detail"]["object"]["key"]
    except (KeyError, TypeError) as exc:
        raise PoisonMessage(
            f"message {parsed.message_id}: malformed EventBridge S3 event (no {exc})"
        ) from exc
    if not isinstance(key, str) or not key:
        raise PoisonMessage(
            f"message {parsed.message_id}: malformed EventBridge S3 event (object key {key!r})"
        )
    parsed.keys.append(key)
    return parsed


# -- control documents -----------------------------------------------------------------------------------------


class ControlDocuments:
    """Small JSON documents kept beside the landing prefix (outside it: no S3 event), e.g. the capture's checkpoint
    and status per cluster: `_cdc_capture/<prefix>/<kind>/<name>.json`."""

    def __init__(self, s3: Any, bucket: str, prefix: str, root: str = "_cdc_capture"):
        self.s3 = s3
        self.bucket = bucket
        self.folder = f"{root}/{prefix.strip('/') or 'root'}"

    def key(self, kind: str, name: str) -> str:
        return f"{self.folder}/{kind}/{name}.json"

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key(kind, name))["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None
        return dict(json.loads(body))

    def write(self, kind: str, name: str, document: dict[str, Any]) -> None:
        self.s3.put_object(
            Bucket=self.bucket,
            Key=self.key(kind, name),
            Body=json.dumps(document, indent=2, default=str).encode(),
            ContentType="application/json",
        )

    def delete(self, kind: str, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key(kind, name))


RESNAPSHOT_REQUESTS = "resnapshot_requests"  # control documents: tables the capture asks to re-snapshot
KEPT_REQUESTS = 200


def request_resnapshot(docs: ControlDocuments, cluster: str, table: str, reason: str, position: str) -> None:
    """Ask for a re-snapshot of `table` (its source name) - e.g. a column added with a default holds it in every
    existing row without a row event. Requested once per binlog position (a replay asks again harmlessly)."""
    document = docs.read(RESNAPSHOT_REQUESTS, cluster) or {"requests": []}
    requests = [r for r in document["requests"] if (r["table"], r["position"]) != (table, position)]
    requests.append(
        {
            "table": table,
            "reason": reason,
            "position": position,
            "requested_at": dt.datetime.now(dt.UTC).isoformat(),
        }
    )
    docs.write(RESNAPSHOT_REQUESTS, cluster, {"requests": requests[-KEPT_REQUESTS:]})


def resnapshot_requests(docs: ControlDocuments, cluster: str) -> list[dict[str, str]]:
    """The cluster's re-snapshot requests, oldest first."""
    document = docs.read(RESNAPSHOT_REQUESTS, cluster) or {}
    return list(document.get("requests", []))
