"""The SQS sensor: S3 events of landed files -> one run per table and day, naming the files to load.

Per tick it receives what is waiting in the queue (at most MAX_MESSAGES_PER_TICK, for at most MAX_POLL_SECONDS) and:
- parses S3 event messages, plain or SNS-wrapped; S3 TestEvents are deleted; keys are URL-decoded;
- maps each key to its mapped table and UTC day; duplicate events for one object collapse into one file;
- yields one RunRequest per day for the tick's tables, with each table's files and its messages' receipt handles
  in run config, and a run_key from the files and the messages' receive counts (a redelivery after a failed run
  gets a new run); the run loads its tables in parallel;
- while its previous load run is still queued or running, receives nothing: what lands meanwhile waits in the
  queue and goes into the next run together (fewer, larger loads under load instead of a growing run queue);
- deletes nothing itself for loadable files: the run deletes its messages after the load succeeded. A failed run
  leaves them to reappear after the visibility timeout; after the queue's max receive count SQS moves them to
  the dead-letter queue;
- a message that is not an S3 event, or a key that maps to no mapped table, is moved to the dead-letter queue
  at once with the reason as a message attribute, and logged - never dropped silently;
- keeps BigQuery's load-job quota (`cdc_assets.quota`): a table whose budget is spent is not loaded now; its
  files are held in the sensor's cursor (their messages kept invisible, not deleted) and go into the next run for
  that table, together with whatever landed meanwhile - more files per load job instead of more jobs.
"""

import datetime as dt
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import dagster as dg
from dagster import MAX_RUNTIME_SECONDS_TAG

from capture import layout
from cdc.mappings import Mappings, TableMapping
from cdc_assets import quota
from cdc_assets.resources import LandingResource
from cdc_assets.tables import NO_DUPLICATES, bigquery_asset_key, load_run_config

# per tick (Dagster's sensor timeout is 60 s): a run takes what was waiting when the tick began, not what keeps
# coming; receiving 1,000 messages from a busy queue takes seconds
MAX_POLL_SECONDS = 20.0
MAX_MESSAGES_PER_TICK = 1000  # a run takes what landed while the previous one loaded


@dataclass
class ParsedMessage:
    message_id: str
    receipt_handle: str
    receive_count: int
    keys: list[str] = field(default_factory=list)
    test_event: bool = False


class PoisonMessage(ValueError):
    """A message that is not an S3 event notification; the text says why."""


def parse_message(message: dict[str, Any]) -> ParsedMessage:
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
    records = body.get("Records")
    if not isinstance(records, list):
        raise PoisonMessage(f"message {parsed.message_id}: no S3 event Records")
    for record in records:
        try:
            if str(record["eventName"]).startswith("ObjectCreated"):
                parsed.keys.append(unquote_plus(record["s3"]["object"]["key"]))
        except (KeyError, TypeError) as exc:
            raise PoisonMessage(f"message {parsed.message_id}: malformed S3 event record ({exc})") from exc
    return parsed


@dataclass
class Batch:
    table: TableMapping
    day: str
    keys: set[str] = field(default_factory=set)
    receipts: dict[str, str] = field(default_factory=dict)  # message id -> receipt handle
    receive_counts: dict[str, int] = field(default_factory=dict)

    def merge(self, other: "Batch") -> None:
        self.keys |= other.keys
        self.receipts.update(other.receipts)
        self.receive_counts.update(other.receive_counts)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table.source,
            "day": self.day,
            "keys": sorted(self.keys),
            "receipts": self.receipts,
            "counts": self.receive_counts,
        }

    def run_key(self) -> str:
        material = (
            "\n".join(sorted(self.keys))
            + "|"
            + ",".join(f"{m}:{c}" for m, c in sorted(self.receive_counts.items()))
        )
        return f"{self.table.target}:{self.day}:{hashlib.sha256(material.encode()).hexdigest()[:24]}"


def _dead_letter(landing: LandingResource, message: dict[str, Any], reason: str) -> None:
    landing.dead_letter(message["Body"], reason, message["ReceiptHandle"])


def collect(landing: LandingResource, mappings: Mappings, log: Any) -> list[Batch]:
    """Receive up to MAX_MESSAGES_PER_TICK messages and group their files per table and day."""
    by_source = {(t.source_schema, t.source_table): t for _, t in mappings.tables()}
    batches: dict[tuple[str, str], Batch] = {}
    sqs = landing.sqs()
    deadline = time.monotonic() + MAX_POLL_SECONDS
    received = 0
    # what is waiting now (approximate, as SQS counts): received whole; files that land meanwhile are left for the
    # next run, or the tick would keep receiving (the capture writes a file per table every few seconds)
    waiting = int(
        sqs.get_queue_attributes(QueueUrl=landing.queue_url, AttributeNames=["ApproximateNumberOfMessages"])
        .get("Attributes", {})
        .get("ApproximateNumberOfMessages", 0)
    )
    wanted = min(MAX_MESSAGES_PER_TICK, max(waiting, 1))
    while received < wanted and time.monotonic() < deadline:
        # the first call waits a second for a message; then take what is there and go
        messages = sqs.receive_message(
            QueueUrl=landing.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0 if received else 1,
            AttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            break
        received += len(messages)
        for message in messages:
            try:
                parsed = parse_message(message)
            except PoisonMessage as exc:
                log.error(f"{exc}; moved to the dead-letter queue")
                _dead_letter(landing, message, str(exc))
                continue
            if parsed.test_event:
                sqs.delete_message(QueueUrl=landing.queue_url, ReceiptHandle=parsed.receipt_handle)
                continue
            for key in parsed.keys:
                try:
                    landed = layout.parse_key(key, landing.prefix)
                except layout.NotALandingFile as exc:
                    reason = f"{exc}; moved to the dead-letter queue"
                    log.error(reason)
                    _dead_letter(landing, message, str(exc))
                    break
                table = by_source.get((landed.schema, landed.table))
                if table is None:
                    reason = (
                        f"{key}: table {landed.schema}.{landed.table} is not in the mappings (or disabled); add it "
                        "to its cluster's mapping file or stop capturing it. Message moved to the dead-letter queue"
                    )
                    log.error(reason)
                    _dead_letter(landing, message, reason)
                    break
                day = (landed.day or message_day(message)).isoformat()
                batch = batches.setdefault((table.source, day), Batch(table, day))
                batch.keys.add(key)
                batch.receipts[parsed.message_id] = parsed.receipt_handle
                batch.receive_counts[parsed.message_id] = parsed.receive_count
    return list(batches.values())


def message_day(message: dict[str, Any]) -> dt.date:
    sent = int(message.get("Attributes", {}).get("SentTimestamp", time.time() * 1000))
    return dt.datetime.fromtimestamp(sent / 1000, dt.UTC).date()


LOAD_RUN_TAG = "cdc/load"  # on the sensor's runs: while one is queued or running, the next tick waits for it
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
ACTIVE_RUN_MAX_AGE_S = 600  # an older "active" run is taken for dead (its worker gone); the sensor goes on
# run monitoring fails a load run still in progress after this long (a worker that died where no health check sees
# it, as with the local default run launcher): its pool slots are freed and its unacknowledged files load again
LOAD_RUN_MAX_RUNTIME_S = 1800


def run_requests(batches: list[Batch]) -> list[dg.RunRequest]:
    """One run per day for all of the tick's tables of that day (they share the daily partitions), each table
    with its own files and messages; the run key covers every file and receive count in it."""
    by_day: dict[str, list[Batch]] = defaultdict(list)
    for batch in batches:
        by_day[batch.day].append(batch)
    requests = []
    for day, group in sorted(by_day.items()):
        files = {b.table.target: (sorted(b.keys), sorted(b.receipts.values())) for b in group}
        run_key = hashlib.sha256("|".join(sorted(b.run_key() for b in group)).encode()).hexdigest()[:32]
        requests.append(
            dg.RunRequest(
                run_key=f"{day}:{run_key}",
                asset_selection=[bigquery_asset_key(b.table) for b in group],
                # only the load's own inline check: the source-vs-BigQuery checks of these assets run in the
                # table_checks job (a selection's default would run them all, for seconds per table, every load)
                asset_check_keys=[
                    dg.AssetCheckKey(bigquery_asset_key(b.table), NO_DUPLICATES) for b in group
                ],
                partition_key=day,
                run_config=load_run_config(files),
                tags={
                    LOAD_RUN_TAG: "sensor",
                    MAX_RUNTIME_SECONDS_TAG: str(LOAD_RUN_MAX_RUNTIME_S),
                    "cdc/tables": str(len(group)),
                    "cdc/files": str(sum(len(b.keys) for b in group)),
                },
            )
        )
    return requests


def active_load_run(instance: dg.DagsterInstance, now: float) -> str | None:
    """The id of the sensor's load run still queued or running (younger than ACTIVE_RUN_MAX_AGE_S), if any."""
    records = instance.get_run_records(
        dg.RunsFilter(statuses=ACTIVE_RUN_STATUSES, tags={LOAD_RUN_TAG: "sensor"}), limit=5
    )
    for record in records:
        if now - record.create_timestamp.timestamp() < ACTIVE_RUN_MAX_AGE_S:
            return record.dagster_run.run_id
    return None


HOLD_MARGIN_SECONDS = 60  # held messages stay invisible this long past the table's next load


def hold(landing: LandingResource, batches: list[Batch], seconds: float) -> None:
    """Keep the held files' messages invisible until their table may load again (receipts stay valid)."""
    sqs = landing.sqs()
    receipts = sorted({r for batch in batches for r in batch.receipts.values()})
    timeout = int(min(43_200, seconds + HOLD_MARGIN_SECONDS))
    for start in range(0, len(receipts), 10):
        entries = [
            {"Id": str(n), "ReceiptHandle": r, "VisibilityTimeout": timeout}
            for n, r in enumerate(receipts[start : start + 10])
        ]
        failed = sqs.change_message_visibility_batch(QueueUrl=landing.queue_url, Entries=entries).get(
            "Failed"
        )
        if failed:  # the message comes back early and is held again: no loss, only a repeat
            raise RuntimeError(f"could not keep held SQS messages invisible: {failed}")


def apply_budget(
    batches: list[Batch], cursor: dict[str, Any], mappings: Mappings, now: float
) -> tuple[list[Batch], list[Batch], dict[str, Any]]:
    """(batches to load now, batches held for later, the new cursor), merging the held ones back in first."""
    by_source = {t.source: t for _, t in mappings.tables()}
    merged: dict[tuple[str, str], Batch] = {}
    for saved in cursor.get("held", []):
        table = by_source.get(saved["table"])
        if table is None:
            continue  # unmapped since: its messages reappear and are reported as unmapped
        merged[(table.source, saved["day"])] = Batch(
            table, saved["day"], set(saved["keys"]), dict(saved["receipts"]), dict(saved["counts"])
        )
    for batch in batches:
        merged.setdefault((batch.table.source, batch.day), Batch(batch.table, batch.day)).merge(batch)
    budget = quota.LoadBudget(cursor.get("budget"), now, quota.table_cap(), quota.project_cap())
    ready: list[Batch] = []
    held: list[Batch] = []
    for key in sorted(merged):
        batch = merged[key]
        (ready if budget.take(batch.table.target) else held).append(batch)
    new_cursor = {"budget": budget.state(), "held": [b.to_json() for b in held]}
    if held:
        new_cursor["next_load_in_s"] = {
            b.table.target: round(budget.seconds_until_load(b.table.target), 1) for b in held
        }
    return ready, held, new_cursor


def build_sqs_sensor(mappings: Mappings, asset_keys: list[dg.AssetKey]) -> dg.SensorDefinition:
    @dg.sensor(
        name="landed_files_sqs",
        minimum_interval_seconds=5,
        asset_selection=asset_keys,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Turns S3 events of landed files into one load run per table and day, within the load-job quota.",
    )
    def landed_files_sqs(
        context: dg.SensorEvaluationContext, landing: LandingResource
    ) -> dg.SensorResult | dg.SkipReason:
        active = active_load_run(context.instance, time.time())
        if active:  # its files are loading; what landed since waits in the queue and goes into the next run
            return dg.SkipReason(f"load run {active} is still queued or running; new files wait in the queue")
        cursor = json.loads(context.cursor) if context.cursor else {}
        batches = collect(landing, mappings, context.log)
        ready, held, new_cursor = apply_budget(batches, cursor, mappings, time.time())
        if held:
            wait = max(new_cursor["next_load_in_s"].values())
            hold(landing, held, wait)
            context.log.info(
                f"load-job budget spent for {len(held)} table(s); their files wait for the next load: "
                + ", ".join(f"{t} in {s:.0f} s" for t, s in sorted(new_cursor["next_load_in_s"].items()))
            )
        grouped: dict[str, int] = defaultdict(int)
        for batch in ready:
            grouped[batch.table.target] += len(batch.keys)
        if ready:
            context.log.info(f"{sum(grouped.values())} landed file(s) for {len(grouped)} table(s)")
        return dg.SensorResult(run_requests=run_requests(ready), cursor=json.dumps(new_cursor))

    return landed_files_sqs
