"""The SQS sensor: S3 events of landed files -> load runs, pipelined: each tick launches one run (per day) for the
tables that have files and fewer than two active runs - the one loading and the next, whose worker starts while the
first loads and whose step waits for it (`cdc_assets.writers`: one writer per table). A table with both keeps its
files in the sensor's cursor (their messages kept invisible) for a later run, so its batches grow instead of a queue
of runs. Runs of different tables at once. The run acknowledges the messages after its load.

Also owns dead-lettering what cannot be loaded (not an S3 event, an unmapped table) and, for batch-mode tables, the
load-job budget (`cdc_assets.quota`). A tick long-polls the queue for up to LONG_POLL_SECONDS and returns as soon as
messages arrive (Dagster's sensor daemon starts a tick at most every 5 s); while a stream run takes orders, a tick
orders in rounds of up to ROUND_SECONDS, so a file waits for the end of its round, not of the tick. docs/design.md,
"Sensor".
"""

import datetime as dt
import hashlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster import MAX_RUNTIME_SECONDS_TAG

from cdc.landing import NotALandingFile, PoisonMessage, parse_key, parse_message
from cdc.mappings import Mappings, TableMapping
from cdc.settings import Settings
from cdc_assets import quota
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import NO_DUPLICATES, load_run_config, set_visibility
from cdc_assets.resources import LandingResource
from cdc_assets.stream_run import ORDER_SLOTS, TableFiles, current_stream_run, send_order
from cdc_assets.writers import (
    RUNS_PER_TABLE,
    Materialized,
    active_runs,
    runs_per_asset,
    table_names,
    written_assets,
)

# Per tick (Dagster's sensor timeout is 60 s): wait up to LONG_POLL_SECONDS for the first message, then take what is
# waiting and go. The daemon starts a tick at most every 5 s, and only on its 5 s loop: a tick that ends within its
# 5 s lets the next start 5 s after it, a longer one makes it wait for the loop after (10 s between ticks).
LONG_POLL_SECONDS = 3
# Below the daemon's loop on purpose: the daemon starts a tick when the last one *began* at least this long ago, and a
# tick begins (on a thread) a little after its loop does, so with 5 s the next loop, 5 s later, found it 4.9 s ago and
# skipped it - a tick every 10 s under load. With 1 s every loop starts one (if the last has ended).
MINIMUM_INTERVAL_SECONDS = 1
MAX_MESSAGES_PER_TICK = 1000
RECEIVERS = 4  # receive calls in flight at once during a tick
# Once messages arrive, the tick also takes those that follow within QUIET_SECONDS of the last one (the rest of a
# capture flush's files, uploaded at once), for at most SETTLE_SECONDS while receives come back partly empty, and
# never takes messages past COLLECT_SECONDS after it began (receives that keep coming back full: a backlog, or many
# tables' flushes landing in bursts), up to MAX_MESSAGES_PER_TICK: what is left is the next tick's, and the files taken
# are ordered now. (A tick that drained on for 20 s held every file it took for those 20 s: 18.8 s pickup at 1x.)
# RECEIVERS receive calls are in flight at once: one at a time took fewer files than 70 tables land at 1x when the
# local SQS answered slowly (its visible messages grew to 1,200 within the phase).
QUIET_SECONDS = 0.3
SETTLE_SECONDS = 1.5
COLLECT_SECONDS = 3.5
# While a stream run takes orders, a tick orders in rounds: each waits up to ROUND_SECONDS for messages, takes what lands
# within ROUND_SECONDS of its start, and orders it at once. Rounds begin until ROUNDS_UNTIL_SECONDS and end by
# ROUNDS_END_SECONDS into the tick, leaving the tick's own work (its run queries, Dagster's bookkeeping: ~0.5 s on a
# busy machine) room within the daemon's 5 s loop - a tick that overran it was skipped (9 of 70 gaps 9-15 s in a 1x +
# 10x run with unbounded rounds). A file waits for the end of the round it lands in (<= 1 s), or, landing between
# ticks, for the next tick's first round - not for the end of a 3.5 s collection.
ROUND_SECONDS = 1.0
ROUNDS_UNTIL_SECONDS = 2.4
ROUNDS_END_SECONDS = 3.0
IN_FLIGHT_HOLD_SECONDS = (
    300  # a message of a table in flight stays invisible this long (it is held again after)
)


@dataclass
class QueuedFiles:
    table: TableMapping
    day: str
    keys: set[str] = field(default_factory=set)
    receipts: dict[str, str] = field(default_factory=dict)  # message id -> receipt handle
    receive_counts: dict[str, int] = field(default_factory=dict)

    def merge(self, other: "QueuedFiles") -> None:
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


class _Receiving:
    """The messages of one tick, received by RECEIVERS threads at once: a receive from a busy local SQS (or a busy
    machine) takes up to a second, and one receiver then took fewer messages than 70 tables' files land."""

    def __init__(self, sqs: Any, queue_url: str, collect_seconds: float = COLLECT_SECONDS) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.collect_seconds = collect_seconds
        self.began = time.monotonic()
        self.messages: list[dict[str, Any]] = []
        self.first_at = self.last_at = 0.0
        self.lock = threading.Lock()

    def receive(self, wait_seconds: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait_seconds,
            AttributeNames=["All"],
        ).get("Messages", [])
        now = time.monotonic()
        with self.lock:
            if messages:
                self.messages += messages
                self.first_at, self.last_at = self.first_at or now, now
        return messages

    def go_on(self, messages: list[dict[str, Any]]) -> bool:
        """Whether a receiver takes more after a receive that brought `messages`."""
        now = time.monotonic()
        with self.lock:
            if len(self.messages) >= MAX_MESSAGES_PER_TICK or now - self.began >= self.collect_seconds:
                return False
            enough = now - self.first_at >= SETTLE_SECONDS
            if not messages:
                return not (now - self.last_at >= QUIET_SECONDS or enough)
            return not (enough and len(messages) < 10)  # files keep landing, no backlog: the next tick's

    def receiver(self) -> None:
        while True:
            messages = self.receive(0)
            if not self.go_on(messages):
                return
            if not messages:
                time.sleep(0.1)


def receive_messages(
    sqs: Any, queue_url: str, wait_seconds: int = 0, collect_seconds: float = COLLECT_SECONDS
) -> list[dict[str, Any]]:
    """One tick's (or round's) messages: the first receive waits up to `wait_seconds` for one; then RECEIVERS threads
    take what is there and what follows closely (the rules above COLLECT_SECONDS), never past `collect_seconds` after
    the first receive began."""
    receiving = _Receiving(sqs, queue_url, collect_seconds)
    if not receiving.receive(wait_seconds):
        return []
    with ThreadPoolExecutor(max_workers=RECEIVERS) as pool:
        for done in [pool.submit(receiving.receiver) for _ in range(RECEIVERS)]:
            done.result()
    return receiving.messages


def collect(
    landing: LandingResource,
    mappings: Mappings,
    log: Any,
    wait_seconds: int = 0,
    collect_seconds: float = COLLECT_SECONDS,
) -> list[QueuedFiles]:
    """Receive what is waiting (the first call waits up to `wait_seconds` for a message), up to
    MAX_MESSAGES_PER_TICK and for at most `collect_seconds`, and group the files per table and day."""
    by_source = {(t.source_schema, t.source_table): t for _, t in mappings.tables()}
    queued: dict[tuple[str, str], QueuedFiles] = {}
    sqs = landing.sqs()
    for message in receive_messages(sqs, landing.queue_url, wait_seconds, collect_seconds):
        try:
            parsed = parse_message(message)
        except PoisonMessage as exc:
            log.error(f"{exc}; moved to the dead-letter queue")
            _dead_letter(landing, message, str(exc))
            continue
        if parsed.test_event or not parsed.keys:  # S3's TestEvent, a deletion: no file to load
            sqs.delete_message(QueueUrl=landing.queue_url, ReceiptHandle=parsed.receipt_handle)
            continue
        for key in parsed.keys:
            try:
                landed = parse_key(key, landing.prefix)
            except NotALandingFile as exc:
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
            files = queued.setdefault((table.source, day), QueuedFiles(table, day))
            files.keys.add(key)
            files.receipts[parsed.message_id] = parsed.receipt_handle
            files.receive_counts[parsed.message_id] = parsed.receive_count
    return list(queued.values())


def message_day(message: dict[str, Any]) -> dt.date:
    sent = int(message.get("Attributes", {}).get("SentTimestamp", time.time() * 1000))
    return dt.datetime.fromtimestamp(sent / 1000, dt.UTC).date()


LOAD_RUN_TAG = "cdc/load"  # on the sensor's load runs
# run monitoring fails a load run still in progress after this long (a worker that died where no health check sees
# it, as with the local default run launcher): its unacknowledged files load again
LOAD_RUN_MAX_RUNTIME_S = 1800


def run_requests(queued: list[QueuedFiles], inline_checked: set[str] | None = None) -> list[dg.RunRequest]:
    """One run per day for all of the tick's tables of that day (they share the daily partitions), each table
    with its own files and messages; the run key covers every file and receive count in it. `inline_checked`: the
    targets whose load carries its duplicate check (batch mode; default all)."""
    by_day: dict[str, list[QueuedFiles]] = defaultdict(list)
    for files in queued:
        by_day[files.day].append(files)
    requests = []
    for day, group in sorted(by_day.items()):
        table_files = {b.table.target: (sorted(b.keys), sorted(b.receipts.values())) for b in group}
        run_key = hashlib.sha256("|".join(sorted(b.run_key() for b in group)).encode()).hexdigest()[:32]
        requests.append(
            dg.RunRequest(
                run_key=f"{day}:{run_key}",
                asset_selection=[bigquery_asset_key(b.table) for b in group],
                # only the load's own inline check: the source-vs-BigQuery checks of these assets run in the
                # table_checks job (a selection's default would run them all, for seconds per table, every load)
                asset_check_keys=[
                    dg.AssetCheckKey(bigquery_asset_key(b.table), NO_DUPLICATES)
                    for b in group
                    if inline_checked is None or b.table.target in inline_checked
                ],
                partition_key=day,
                run_config=load_run_config(table_files),
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
    """The id of a sensor load run still queued or running (younger than ACTIVE_RUN_MAX_AGE_S), if any."""
    for record in active_runs(instance, now):
        if record.dagster_run.tags.get(LOAD_RUN_TAG) == "sensor":
            return record.dagster_run.run_id
    return None


# what active runs have materialized, read on from tick to tick (the code server keeps this module loaded)
MATERIALIZED = Materialized()


def assets_in_flight(
    instance: dg.DagsterInstance,
    now: float,
    names: Mapping[str, dg.AssetKey],
    streamed: Collection[dg.AssetKey] = (),
) -> set[dg.AssetKey]:
    """The assets whose tables have RUNS_PER_TABLE active runs (a load, a backfill, a re-snapshot): one writing,
    one waiting to follow it (cdc_assets.writers); of the `streamed` ones (a stream run takes their files), those
    with any such run. Their files wait in the cursor for a later run."""
    counts = runs_per_asset(instance, now, names, MATERIALIZED)
    return {asset for asset, runs in counts.items() if runs >= (1 if asset in streamed else RUNS_PER_TABLE)}


def order_for_stream_run(
    instance: dg.DagsterInstance, stream: dg.RunRecord, ready: list[QueuedFiles], cursor: dict[str, Any]
) -> None:
    """Send the ready files of the stream run's tables to it, as one order in the next ring slot."""
    slot = int(cursor.get("order_slot", 0))
    send_order(
        instance,
        stream.dagster_run.run_id,
        slot,
        [TableFiles(f.table.target, f.day, set(f.keys), set(f.receipts.values())) for f in ready],
    )
    cursor["order_slot"] = (slot + 1) % ORDER_SLOTS


HOLD_MARGIN_SECONDS = 60  # held messages stay invisible this long past the table's next load


def hold(landing: LandingResource, queued: list[QueuedFiles], seconds: float, log: Any = None) -> None:
    """Keep the held files' messages invisible until their table may load again. A message SQS no longer knows by
    its handle (a run in flight loaded its file and deleted it; or it came back and was received again) is logged and
    left: its files stay held (loading one again adds nothing twice), and the tick goes on to keep its cursor."""
    receipts = sorted({r for files in queued for r in files.receipts.values()})
    failed = set_visibility(landing.sqs(), landing.queue_url, receipts, seconds + HOLD_MARGIN_SECONDS)
    if failed and log is not None:
        codes = sorted({str(entry.get("Code")) for entry in failed})
        log.warning(
            f"{len(failed)} held message(s) could not be kept invisible ({', '.join(codes)}): deleted by the run that "
            "loaded their files, or received again; their files stay held"
        )


def merge_held(cursor: dict[str, Any], queued: list[QueuedFiles], mappings: Mappings) -> list[QueuedFiles]:
    """The files held in the cursor and the ones just received, per table and day."""
    by_source = {t.source: t for _, t in mappings.tables()}
    merged: dict[tuple[str, str], QueuedFiles] = {}
    for saved in cursor.get("held", []):
        table = by_source.get(saved["table"])
        if table is None:
            continue  # unmapped since: its messages reappear and are reported as unmapped
        merged[(table.source, saved["day"])] = QueuedFiles(
            table, saved["day"], set(saved["keys"]), dict(saved["receipts"]), dict(saved["counts"])
        )
    for files in queued:
        merged.setdefault((files.table.source, files.day), QueuedFiles(files.table, files.day)).merge(files)
    return [merged[key] for key in sorted(merged)]


def apply_budget(
    queued: list[QueuedFiles], cursor: dict[str, Any], mappings: Mappings, now: float, caps: tuple[int, int]
) -> tuple[list[QueuedFiles], list[QueuedFiles], dict[str, Any]]:
    """(files to load now, files held for later, the new cursor), merging the held ones back in first. `caps`:
    load jobs per table and per project per day."""
    budget = quota.LoadBudget(cursor.get("budget"), now, caps[0], caps[1])
    ready: list[QueuedFiles] = []
    held: list[QueuedFiles] = []
    for files in merge_held(cursor, queued, mappings):
        (ready if budget.take(files.table.target) else held).append(files)
    new_cursor = {"budget": budget.state(), "held": [b.to_json() for b in held]}
    if held:
        new_cursor["next_load_in_s"] = {
            b.table.target: round(budget.seconds_until_load(b.table.target), 1) for b in held
        }
    return ready, held, new_cursor


@dataclass
class TickPlan:
    """What one tick does with the files it has: load now, or hold (in flight, or over the load-job budget)."""

    ready: list[QueuedFiles]
    in_flight: list[QueuedFiles]
    over_budget: list[QueuedFiles]
    cursor: dict[str, Any]


def plan_tick(
    queued: list[QueuedFiles],
    cursor: dict[str, Any],
    mappings: Mappings,
    now: float,
    held_assets: set[dg.AssetKey],
    settings: Settings,
) -> TickPlan:
    """Tables in flight keep their files; the free ones load now - a batch-mode table within its load-job budget."""
    pending = merge_held(cursor, queued, mappings)
    in_flight = [f for f in pending if bigquery_asset_key(f.table) in held_assets]
    free = [f for f in pending if bigquery_asset_key(f.table) not in held_assets]
    streaming = [f for f in free if (f.table.load_mode or settings.load_mode) == "streaming"]
    batch = [f for f in free if f not in streaming]
    caps = (settings.max_load_jobs_per_table_per_day, settings.max_load_jobs_per_project_per_day)
    batch_ready, over_budget, new_cursor = apply_budget(
        batch, {"budget": cursor.get("budget")}, mappings, now, caps
    )
    new_cursor["held"] = [f.to_json() for f in in_flight + over_budget]
    return TickPlan(streaming + batch_ready, in_flight, over_budget, new_cursor)


def build_sqs_sensor(
    mappings: Mappings, asset_keys: list[dg.AssetKey], settings: Settings
) -> dg.SensorDefinition:
    batch_tables = {t.target for _, t in mappings.tables() if (t.load_mode or settings.load_mode) == "batch"}
    names = table_names(t for _, t in mappings.tables())

    @dg.sensor(
        name="landed_files_sqs",
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        asset_selection=asset_keys,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Turns S3 events of landed files into load runs of the tables not in flight (one writer per "
        "table), within the load-job quota of batch-mode tables.",
    )
    def landed_files_sqs(
        context: dg.SensorEvaluationContext, landing: LandingResource
    ) -> dg.SensorResult | dg.SkipReason:
        began = time.monotonic()
        now = time.time()
        cursor = json.loads(context.cursor) if context.cursor else {}
        stream = current_stream_run(context.instance, now) if settings.stream_run_minutes else None
        streamed = written_assets(stream.dagster_run, names) if stream else set()
        held_assets = assets_in_flight(context.instance, now, names, streamed)
        to_run: dict[tuple[str, str], QueuedFiles] = {}
        round_ = 0
        while True:  # one round, or (a stream run taking orders) rounds until ROUNDS_UNTIL_SECONDS
            if stream is not None:
                left = ROUNDS_END_SECONDS - (time.monotonic() - began)
                wait, seconds = int(min(ROUND_SECONDS, left)), max(0.1, min(ROUND_SECONDS, left))
            else:
                waiting_free = any(
                    bigquery_asset_key(f.table) not in held_assets for f in merge_held(cursor, [], mappings)
                )
                wait, seconds = (0 if waiting_free else LONG_POLL_SECONDS), COLLECT_SECONDS
            queued = collect(landing, mappings, context.log, wait, seconds)
            cursor, runs = tick_round(context, landing, queued, cursor, held_assets, stream, streamed, round_)
            for files in runs:  # their tables are in flight from now on: a later round holds their files
                key = (files.table.source, files.day)
                to_run.setdefault(key, QueuedFiles(files.table, files.day)).merge(files)
                held_assets.add(bigquery_asset_key(files.table))
            round_ += 1
            if stream is None or time.monotonic() - began >= ROUNDS_UNTIL_SECONDS:
                break
        return dg.SensorResult(
            run_requests=run_requests(list(to_run.values()), batch_tables), cursor=json.dumps(cursor)
        )

    def tick_round(
        context: dg.SensorEvaluationContext,
        landing: LandingResource,
        queued: list[QueuedFiles],
        cursor: dict[str, Any],
        held_assets: set[dg.AssetKey],
        stream: dg.RunRecord | None,
        streamed: set[dg.AssetKey],
        round_: int,
    ) -> tuple[dict[str, Any], list[QueuedFiles]]:
        """Plan one round's files (and the ones held): order the streamed ones, hold the ones in flight or over
        budget; (the new cursor, the files to request load runs for)."""
        plan = plan_tick(queued, cursor, mappings, time.time(), held_assets, settings)
        plan.cursor["order_slot"] = cursor.get("order_slot", 0)
        ordered = [  # a table switched to batch mode since the stream run started loads in runs of its own
            f
            for f in plan.ready
            if bigquery_asset_key(f.table) in streamed
            and (f.table.load_mode or settings.load_mode) == "streaming"
        ]
        if stream is not None and ordered:
            order_for_stream_run(context.instance, stream, ordered, plan.cursor)
        received = {r for files in queued for r in files.receipts.values()}
        newly_in_flight = [
            QueuedFiles(f.table, f.day, receipts={m: r for m, r in f.receipts.items() if r in received})
            for f in plan.in_flight
        ]
        hold(landing, newly_in_flight, IN_FLIGHT_HOLD_SECONDS, context.log)
        if plan.over_budget and (
            round_ == 0 or any(set(f.receipts.values()) & received for f in plan.over_budget)
        ):
            wait = max(plan.cursor["next_load_in_s"].values())
            hold(landing, plan.over_budget, wait, context.log)
            context.log.info(
                f"load-job budget spent for {len(plan.over_budget)} table(s); their files wait for the next load: "
                + ", ".join(f"{t} in {s:.0f} s" for t, s in sorted(plan.cursor["next_load_in_s"].items()))
            )
        if plan.ready:
            files = sum(len(f.keys) for f in plan.ready)
            context.log.info(
                f"{files} landed file(s) for {len({f.table.target for f in plan.ready})} table(s)"
                + (
                    f" ({len(ordered)} to stream run {stream.dagster_run.run_id})"
                    if stream and ordered
                    else ""
                )
                + (
                    f"; {len(plan.in_flight)} table(s) in flight keep theirs for their next run"
                    if plan.in_flight
                    else ""
                )
            )
        return plan.cursor, [f for f in plan.ready if f not in ordered]

    return landed_files_sqs
