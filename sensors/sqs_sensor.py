"""The SQS sensor: S3 events of landed files -> load runs, pipelined: each tick launches one run (per day) for the
tables that have files and fewer than two active runs - the one loading and the next, whose worker starts while the
first loads and whose step waits for it (`cdc_assets.writers`: one writer per table). A table with both keeps its
files in the sensor's cursor (their messages kept invisible) for a later run, so its batches grow instead of a queue
of runs. Runs of different tables at once. The run acknowledges the messages after its load.

Also owns dead-lettering what cannot be loaded (not an S3 event, an unmapped table) and, for batch-mode tables, the
load-job budget (`cdc_assets.quota`). A tick long-polls the queue for up to LONG_POLL_SECONDS and returns as soon as
messages arrive (Dagster's sensor daemon starts a tick at most every 5 s); while a stream run takes orders, the
continuous receiver (`sensors.receiver`) receives instead and orders the stream run's files as they land, and a tick
takes what it kept. docs/design.md, "Sensor".
"""

import hashlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster import MAX_RUNTIME_SECONDS_TAG

from cdc.mappings import Mappings, TableMapping
from cdc.settings import Settings
from cdc_assets import quota
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import NO_DUPLICATES, load_run_config, set_visibility
from cdc_assets.resources import LandingResource
from cdc_assets.stream_run import TableFiles, current_stream_run
from cdc_assets.writers import (
    RUNS_PER_TABLE,
    Materialized,
    active_runs,
    runs_per_asset,
    table_names,
    written_assets,
)
from sensors.receiver import (
    COLLECT_SECONDS,
    NOT_LOADABLE,
    Receiver,
    Route,
    UnmappedTable,
    landed_files,
    receive_messages,
    running,
)

# Per tick (Dagster's sensor timeout is 60 s): wait up to LONG_POLL_SECONDS for the first message, then take what is
# waiting and go (`sensors.receiver`: what a receive takes). The daemon starts a tick at most every 5 s, and only on
# its 5 s loop: a tick that ends within its 5 s lets the next start 5 s after it, a longer one makes it wait for the
# loop after (10 s between ticks). While a stream run takes orders the continuous receiver receives instead, and a
# tick takes what it kept.
LONG_POLL_SECONDS = 3
# Below the daemon's loop on purpose: the daemon starts a tick when the last one *began* at least this long ago, and a
# tick begins (on a thread) a little after its loop does, so with 5 s the next loop, 5 s later, found it 4.9 s ago and
# skipped it - a tick every 10 s under load. With 1 s every loop starts one (if the last has ended).
MINIMUM_INTERVAL_SECONDS = 1
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


def collect(
    landing: LandingResource,
    mappings: Mappings,
    log: Any,
    wait_seconds: int = 0,
    collect_seconds: float = COLLECT_SECONDS,
    received: list[dict[str, Any]] | None = None,
) -> list[QueuedFiles]:
    """Receive what is waiting (the first call waits up to `wait_seconds` for a message), up to
    MAX_MESSAGES_PER_TICK and for at most `collect_seconds` - or take the messages `received` (by the continuous
    receiver) instead - and group the files per table and day; dead-letter what cannot be loaded."""
    by_source = {(t.source_schema, t.source_table): t for _, t in mappings.tables()}
    queued: dict[tuple[str, str], QueuedFiles] = {}
    sqs = landing.sqs()
    if received is None:
        received = receive_messages(sqs, landing.queue_url, wait_seconds, collect_seconds)
    for message in received:
        try:
            parsed, files = landed_files(message, landing.prefix, by_source)
        except NOT_LOADABLE as exc:  # an unmapped table's reason says where the message went itself
            log.error(
                str(exc) if isinstance(exc, UnmappedTable) else f"{exc}; moved to the dead-letter queue"
            )
            _dead_letter(landing, message, str(exc))
            continue
        if not files:  # S3's TestEvent, a deletion: no file to load
            sqs.delete_message(QueueUrl=landing.queue_url, ReceiptHandle=parsed.receipt_handle)
            continue
        for table, day, key in files:
            group = queued.setdefault((table.source, day), QueuedFiles(table, day))
            group.keys.add(key)
            group.receipts[parsed.message_id] = parsed.receipt_handle
            group.receive_counts[parsed.message_id] = parsed.receive_count
    return list(queued.values())


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


# what active runs have materialized (MATERIALIZED), read by one planning at a time: the tick's or the receiver's
_PLANNING = threading.Lock()


def build_sqs_sensor(
    mappings: Mappings, asset_keys: list[dg.AssetKey], settings: Settings
) -> dg.SensorDefinition:
    batch_tables = {t.target for _, t in mappings.tables() if (t.load_mode or settings.load_mode) == "batch"}
    streaming = frozenset(t.target for _, t in mappings.tables() if t.target not in batch_tables)
    names = table_names(t for _, t in mappings.tables())

    def plan_route(instance: dg.DagsterInstance) -> Route:
        """The stream run taking orders (if one runs), its tables and the tables other runs hold."""
        now = time.time()
        with _PLANNING:
            stream = current_stream_run(instance, now) if settings.stream_run_minutes else None
            streamed = written_assets(stream.dagster_run, names) if stream else set()
            held = assets_in_flight(instance, now, names, streamed)
        return Route(stream, frozenset(streamed), frozenset(held), streaming)

    @dg.sensor(
        name="landed_files_sqs",
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        asset_selection=asset_keys,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Turns S3 events of landed files into load runs of the tables not in flight (one writer per "
        "table), within the load-job quota of batch-mode tables; orders streaming tables' files to the stream run.",
    )
    def landed_files_sqs(
        context: dg.SensorEvaluationContext, landing: LandingResource
    ) -> dg.SensorResult | dg.SkipReason:
        cursor = json.loads(context.cursor) if context.cursor else {}
        receiver = running(landing.queue_url)
        if (
            receiver is not None and receiver.mappings is not mappings
        ):  # mappings deployed over in this process
            received, receiver = receiver.stop(), None
        else:
            received = []
        route = receiver.route(fresh=True) if receiver is not None else plan_route(context.instance)
        if route.stream is not None:  # the continuous receiver orders the stream run's files as they land
            if receiver is None:
                slot = int(cursor.get("order_slot", 0))
                receiver = Receiver(landing, mappings, context.instance, plan_route, route, slot).start()
            receiver.renew()
            kept, lines, files, tables = receiver.take()
            received += kept
            for level, line in lines:
                getattr(context.log, level)(line)
            if files:
                run_id = route.stream.dagster_run.run_id
                context.log.info(
                    f"{files} landed file(s) of {tables} table(s) ordered to stream run {run_id}"
                )
        else:
            if receiver is not None:  # no stream run takes orders any more
                received += receiver.stop()
                receiver = None
            waiting_free = any(
                bigquery_asset_key(f.table) not in route.held for f in merge_held(cursor, [], mappings)
            )
            wait = 0 if received or waiting_free else LONG_POLL_SECONDS
            received += receive_messages(landing.sqs(), landing.queue_url, wait, COLLECT_SECONDS)
        queued = collect(landing, mappings, context.log, received=received)
        cursor, runs = plan_and_order(context, landing, queued, cursor, route, receiver)
        return dg.SensorResult(run_requests=run_requests(runs, batch_tables), cursor=json.dumps(cursor))

    def plan_and_order(
        context: dg.SensorEvaluationContext,
        landing: LandingResource,
        queued: list[QueuedFiles],
        cursor: dict[str, Any],
        route: Route,
        receiver: Receiver | None,
    ) -> tuple[dict[str, Any], list[QueuedFiles]]:
        """Plan the tick's files (and the ones held): order the streamed ones to the stream run, hold the ones in
        flight or over budget; (the new cursor, the files to request load runs for)."""
        plan = plan_tick(queued, cursor, mappings, time.time(), set(route.held), settings)
        ordered = [f for f in plan.ready if receiver is not None and route.orders(f.table)]
        if receiver is not None and route.stream is not None and ordered:
            receiver.order(
                route.stream.dagster_run.run_id,
                [TableFiles(f.table.target, f.day, set(f.keys), set(f.receipts.values())) for f in ordered],
            )
        plan.cursor["order_slot"] = receiver.slot if receiver is not None else cursor.get("order_slot", 0)
        received = {r for files in queued for r in files.receipts.values()}
        newly_in_flight = [
            QueuedFiles(f.table, f.day, receipts={m: r for m, r in f.receipts.items() if r in received})
            for f in plan.in_flight
        ]
        hold(landing, newly_in_flight, IN_FLIGHT_HOLD_SECONDS, context.log)
        if plan.over_budget:
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
                + (f" ({len(ordered)} to the stream run)" if ordered else "")
                + (
                    f"; {len(plan.in_flight)} table(s) in flight keep theirs for their next run"
                    if plan.in_flight
                    else ""
                )
            )
        return plan.cursor, [f for f in plan.ready if f not in ordered]

    return landed_files_sqs
