"""The standing stream run: one long-lived Dagster run that loads streaming-mode tables as their files land, so a
load costs no run to create and no worker to start (docs/design.md, "Stream runs").

The SQS sensor stays the only consumer of the queue: for the tables a started stream run streams, it writes each
tick's files as an order into a ring of slots in the Dagster instance's key-value store (the run's storage: SQLite
locally, Postgres in production) instead of requesting a load run. The stream run polls the ring, loads each table
with the load step's own code (`load_run.TableTask`: one table at a time, all its files of a day), acknowledges the
table's messages after its load and logs one materialization per load, of the table's day partition. Loads start
on idle threads only, the tables whose files wait longest first.

One writer per table (`cdc_assets.writers`): the run waits for earlier runs that hold a table, and yields a table to
any later run that writes it (a backfill, a re-snapshot, the next stream run) once its own load of it is done -
its pending files' messages become visible again, and the sensor holds them until that run has finished. It beats
a heartbeat into the key-value store; a run that stopped beating holds nothing. It takes orders for its configured
minutes, then finishes its loads and ends; the keeper sensor starts the next run two minutes before, which takes over
as soon as it has started.
"""

import datetime as dt
import json
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from pydantic import Field

from cdc.mappings import Mappings, TableMapping
from cdc.settings import Settings
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import (
    KeptInvisible,
    LoadStepSettings,
    TableTask,
    acknowledge,
    set_visibility,
    settle,
)
from cdc_assets.resources import AlertWebhookResource, BigQueryCdcResource, LandingResource
from cdc_assets.stream_loader import StreamState
from cdc_assets.writers import (
    HEARTBEAT_KEY,
    POLL_SECONDS,
    RELEASED_TO,
    STREAM_JOB,
    STREAM_OP,
    HandOver,
    Materialized,
    active_runs,
    is_stream_run,
    later_holders,
    stream_run_alive,
    table_names,
)

ORDER_KEY = "cdc/stream-orders/"  # + slot number
# the sensor writes one order per tick or receive; the run reads the slots only when the head has moved
ORDER_SLOTS = 64
ORDER_HEAD_KEY = "cdc/stream-orders-head"  # "<slot>:<id>" of the order written last (one key the run polls)
HEARTBEAT_EVERY_S = 2.0
LOOK_AROUND_EVERY_S = 1.0  # how often the run looks for later runs that take its tables over
STREAM_RUN_TAG = "cdc/stream"
ALERT_REPEAT_S = 600.0
READ_KEYS_KEPT = 1024  # per table: the files its last loads read (an order naming only those needs no load)


class StreamRunConfig(dg.Config):
    tables: list[str] = Field(description="The BigQuery targets `dataset.table` this run streams.")
    minutes: float = Field(description="How long the run takes orders; then it finishes its loads and ends.")


def stream_run_config(tables: Iterable[str], minutes: float) -> dict[str, Any]:
    return {"ops": {STREAM_OP: {"config": {"tables": sorted(tables), "minutes": minutes}}}}


def taking_orders_until(record: dg.RunRecord) -> float:
    """When a started stream run stops taking orders (its start + its configured minutes)."""
    run = record.dagster_run
    config = (run.run_config.get("ops", {}) if isinstance(run.run_config, dict) else {}).get(STREAM_OP) or {}
    minutes = float(config.get("config", {}).get("minutes") or 0)
    return (record.start_time or record.create_timestamp.timestamp()) + minutes * 60


def stream_runs(instance: dg.DagsterInstance, now: float) -> list[dg.RunRecord]:
    """Active stream runs, oldest first."""
    records = [r for r in active_runs(instance, now) if is_stream_run(r.dagster_run)]
    return sorted(records, key=lambda r: r.create_timestamp)


def current_stream_run(
    instance: dg.DagsterInstance, now: float, margin_s: float = 10.0
) -> dg.RunRecord | None:
    """The stream run the sensor sends orders to: the newest one started, beating and taking orders for at least
    `margin_s` more seconds (an order it does not take comes back through SQS: later, not lost)."""
    for record in reversed(stream_runs(instance, now)):
        if (
            record.dagster_run.status == dg.DagsterRunStatus.STARTED
            and stream_run_alive(instance, record, now)
            and taking_orders_until(record) - now > margin_s
        ):
            return record
    return None


# -- orders: the sensor -> the stream run ------------------------------------------------------------------------


@dataclass
class TableFiles:
    """A table's landed files of one day, and the receipt handles of their SQS messages."""

    target: str
    day: str
    keys: set[str] = field(default_factory=set)
    receipts: set[str] = field(default_factory=set)
    ordered_at: float = 0.0  # when the sensor sent the first order naming them (0: not known)


def send_order(instance: dg.DagsterInstance, run_id: str, slot: int, files: Iterable[TableFiles]) -> None:
    """Write one order (a sensor tick's files) for stream run `run_id` into ring slot `slot`."""
    order_id = uuid.uuid4().hex
    order = {
        "id": order_id,
        "run": run_id,
        "sent": time.time(),
        "tables": [
            {"table": f.target, "day": f.day, "keys": sorted(f.keys), "receipts": sorted(f.receipts)}
            for f in files
        ],
    }
    # one key per call, the slot before the head: the SQL run storage's set_cursor_values inserts none of the keys
    # it is given when one of them exists already (it then updates those that exist)
    instance.run_storage.set_cursor_values({f"{ORDER_KEY}{slot % ORDER_SLOTS}": json.dumps(order)})
    instance.run_storage.set_cursor_values({ORDER_HEAD_KEY: f"{slot % ORDER_SLOTS}:{order_id}"})


class OrderInbox:
    """A stream run's reading of the ring: every order for it not taken before. It polls the head (one key: the slot
    and id of the order written last) and reads only the slots written since the head it last found in the ring -
    usually one (reading and parsing the 64 slots on every poll took a quarter of the run's time at 10x). The sensor
    writes the slots in turn, so those are the slots after that one up to the head's; the whole ring when the run
    has found no head yet, or the head is not a slot it knows."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str) -> None:
        self._instance = instance
        self._run_id = run_id
        self._taken: deque[str] = deque(maxlen=4 * ORDER_SLOTS)
        self._head: str | None = None  # the head when the ring last held the order it names
        self._slot: int | None = None  # that order's slot

    def _slots_since(self, slot: str) -> list[int]:
        if self._slot is None or not slot.isdigit() or int(slot) >= ORDER_SLOTS:
            return list(range(ORDER_SLOTS))
        written = (int(slot) - self._slot) % ORDER_SLOTS or ORDER_SLOTS  # the same slot again: a whole turn
        return [(self._slot + 1 + n) % ORDER_SLOTS for n in range(written)]

    def take(self) -> list[TableFiles]:
        storage = self._instance.run_storage
        head = storage.get_cursor_values({ORDER_HEAD_KEY}).get(ORDER_HEAD_KEY)
        if head is not None and head == self._head:
            return []
        head_slot, _, head_id = (head or "").partition(":")
        slots = self._slots_since(head_slot)
        files = []
        for key, value in storage.get_cursor_values({f"{ORDER_KEY}{slot}" for slot in slots}).items():
            try:
                order = json.loads(value)
            except ValueError:
                continue
            if head_id and order.get("id") == head_id:
                # the ring holds the head's order: until the head moves, nothing new
                self._head, self._slot = head, int(key.rsplit("/", 1)[1])
            if order.get("run") != self._run_id or order.get("id") in self._taken:
                continue
            self._taken.append(order["id"])
            sent = float(order.get("sent") or 0.0)
            files += [
                TableFiles(t["table"], t["day"], set(t["keys"]), set(t["receipts"]), sent)
                for t in order.get("tables", [])
            ]
        return files


# -- the run -----------------------------------------------------------------------------------------------------


@dataclass
class _Load:
    files: TableFiles
    task: TableTask
    started_at: float = 0.0  # when a pool thread began the load
    result: dg.MaterializeResult | None = None  # settled (acknowledged) in the pool thread


class _QueuedLog:
    """A logger for the pool's threads: the run's thread shows their lines in the run's log."""

    def __init__(self, lines: "queue.Queue[tuple[str, str]]") -> None:
        self._lines = lines

    def info(self, message: str) -> None:
        self._lines.put(("info", message))

    def warning(self, message: str) -> None:
        self._lines.put(("warning", message))

    def error(self, message: str) -> None:
        self._lines.put(("error", message))


class StreamRun:
    """The loop of one stream run: take orders, hand tables over, load, report (one thread; loads in a pool)."""

    def __init__(
        self,
        context: dg.OpExecutionContext,
        config: StreamRunConfig,
        landing: LandingResource,
        bigquery: BigQueryCdcResource,
        alerts: AlertWebhookResource,
        tables: Mapping[str, TableMapping],
        settings: LoadStepSettings,
        names: Mapping[str, dg.AssetKey],
    ) -> None:
        self.context = context
        self.instance = context.instance
        self.landing = landing
        self.alerts = alerts
        self.alerted: dict[str, float] = {}
        self.settings = settings
        self.names = names
        self.tables = {target: tables[target] for target in config.tables if target in tables}
        self.workers = max(1, min(settings.max_parallel_loads, len(self.tables)))  # the load pool's threads
        self.deadline = time.monotonic() + config.minutes * 60
        self.inbox = OrderInbox(self.instance, context.run_id)
        self.hand_over = HandOver(self.instance, context.run_id, names, context.log.info)
        record = self.instance.get_run_record_by_id(context.run_id)
        if record is None:
            raise dg.Failure(description=f"stream run {context.run_id} is not in the instance's run storage")
        self.mine = record
        self.materialized = Materialized()
        self.pending: dict[tuple[str, str], TableFiles] = {}
        self.loading: dict[Future[TableTask], _Load] = {}
        self.released: set[tuple[str, str]] = set()
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.s3, self.sqs, self.bq = landing.s3(), landing.sqs(), bigquery.client()
        self.write = bigquery.write_client()
        # the messages of the files ordered, until acknowledged or given back (a table may wait behind a long load)
        self.invisible = KeptInvisible(
            self.sqs, landing.queue_url, lambda message: self.lines.put(("warning", message))
        )
        self.last_beat = 0.0
        self.loads = self.failures = self.skipped = 0
        # per table, between its loads: its state (read from S3 once) and the files its loads read - each load
        # reads every file not read yet, so the orders that follow often name only files a load has read already
        self.states: dict[str, StreamState] = {}
        self.read_keys: dict[str, set[str]] = {}
        self.acks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acknowledge")
        # materializations and log lines are events the instance stores (a SQLite or Postgres write each): written on
        # a thread of their own, in order, so the run's thread goes on taking orders and starting loads meanwhile
        # (on the run's thread they took 44 % of its time in a 1x bench, every load waiting behind them)
        self.reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="report")
        self.reports: list[Future[None]] = []

    def beat(self) -> None:
        now = time.time()
        if now - self.last_beat >= HEARTBEAT_EVERY_S:
            self.instance.run_storage.set_cursor_values({HEARTBEAT_KEY + self.context.run_id: repr(now)})
            self.last_beat = now

    def take_orders(self) -> None:
        for files in self.inbox.take():
            if files.target not in self.tables:
                self.context.log.warning(
                    f"an order names {files.target}, which this run does not stream; its messages come back"
                )
                self.give_back(files.receipts)
                continue
            mine = self.pending.setdefault((files.target, files.day), TableFiles(files.target, files.day))
            mine.keys |= files.keys
            mine.receipts |= files.receipts
            self.invisible.keep(files.receipts)
            mine.ordered_at = min(mine.ordered_at or files.ordered_at, files.ordered_at or mine.ordered_at)

    def busy(self) -> set[str]:
        return {load.files.target for load in self.loading.values()}

    def look_around(self) -> tuple[set[str], bool]:
        """The other runs, read once: the tables yielded to later runs, and whether a later stream run has started."""
        now = time.time()
        # only runs created after this one matter (a tie in creation time is ordered by run id: a second earlier)
        after = self.mine.create_timestamp - dt.timedelta(seconds=1)
        records = [
            r for r in active_runs(self.instance, now, after) if r.dagster_run.run_id != self.context.run_id
        ]
        return self.yield_to_later_runs(records), self.superseded(records)

    def yield_to_later_runs(self, records: list[dg.RunRecord]) -> set[str]:
        """Release the tables later runs hold (once not loading them); the targets yielded."""
        later = later_holders(self.instance, self.mine, time.time(), self.names, self.materialized, records)
        yielded = set()
        busy = self.busy()
        for target, table in self.tables.items():
            runs = later.get(bigquery_asset_key(table), [])
            if not runs:
                continue
            yielded.add(target)
            if target in busy:
                continue  # released once its load is done
            self.drop_pending(target)
            self.forget(target)
            for run_id in runs:
                if (target, run_id) not in self.released:  # after the materializations of its loads
                    self.submit_report(
                        self.context.log_event,
                        dg.AssetObservation(
                            asset_key=bigquery_asset_key(table), metadata={RELEASED_TO: run_id}
                        ),
                    )
                    self.released.add((target, run_id))
        return yielded

    def superseded(self, records: list[dg.RunRecord]) -> bool:
        """A later stream run has started (and beats)."""
        now = time.time()
        return any(
            is_stream_run(r.dagster_run)
            and (r.create_timestamp, r.dagster_run.run_id)
            > (self.mine.create_timestamp, self.mine.dagster_run.run_id)
            and r.dagster_run.status == dg.DagsterRunStatus.STARTED
            and stream_run_alive(self.instance, r, now)
            for r in records
        )

    def forget(self, target: str) -> None:
        """Drop what the run knows of a table between its loads (another run may write it now, or a load failed):
        its next load reads the state from S3 and loads whatever its orders name."""
        self.states.pop(target, None)
        self.read_keys.pop(target, None)

    def remember(self, target: str, task: TableTask) -> None:
        if task.streamed is not None and task.streamed.read:
            kept = self.read_keys.setdefault(target, set())
            kept.update(task.streamed.read)
            if len(kept) > READ_KEYS_KEPT:
                self.read_keys[target] = set(sorted(kept)[-READ_KEYS_KEPT:])  # keys sort by write time

    def skip_read(self, files: TableFiles) -> bool:
        """Acknowledge files this run's loads have read already (their changes are in BigQuery, their names in
        the ledger and the state): no load for an order that names only those."""
        if not files.keys <= self.read_keys.get(files.target, set()):
            return False
        self.invisible.drop(files.receipts)
        self.acks.submit(self.acknowledge_read, sorted(files.receipts))  # off the run's thread, like settling
        self.skipped += 1
        return True

    def acknowledge_read(self, receipts: list[str]) -> None:
        log = _QueuedLog(self.lines)
        try:
            acknowledge(self.sqs, self.landing.queue_url, receipts, log)
        except Exception as exc:  # SQS out of reach: the messages come back, and are acknowledged then
            log.warning(
                f"could not acknowledge {len(receipts)} message(s) of files loaded already ({exc}); they come "
                "back after their visibility timeout"
            )

    def drop_pending(self, target: str | None = None) -> None:
        """Give up pending files (of one table, or all): their messages become visible again, for a later run."""
        for key in [k for k in self.pending if target is None or k[0] == target]:
            self.give_back(self.pending.pop(key).receipts)

    def give_back(self, receipts: set[str]) -> None:
        """Make messages visible now; if SQS cannot be reached they come back after their visibility timeout."""
        self.invisible.drop(receipts)
        try:
            set_visibility(self.sqs, self.landing.queue_url, sorted(receipts), 0)
        except Exception as exc:
            self.context.log.warning(
                f"could not give {len(receipts)} message(s) back to SQS now ({exc}); they "
                "come back after their visibility timeout"
            )

    def start_loads(self, pool: ThreadPoolExecutor, yielded: set[str]) -> None:
        """Start loads on the pool's idle threads only, the tables whose files wait longest first: a load takes its
        table's files when it starts, so files that land while the pool is busy join the table's next load instead
        of waiting behind a load queued before them (with every table submitted at once, a file landing while its
        table's load sat in the pool's queue waited for that load and then its own)."""
        busy = self.busy()
        candidates = {target for target, _ in self.pending if target not in busy and target not in yielded}
        if len(self.loading) >= self.workers or not candidates:
            return
        free = self.hand_over.free([bigquery_asset_key(self.tables[t]) for t in candidates])
        waited: dict[str, float] = {}
        for (target, _), files in self.pending.items():
            if target in candidates and bigquery_asset_key(self.tables[target]) in free:
                ordered = files.ordered_at or time.time()
                waited[target] = min(waited.get(target, ordered), ordered)
        for target in sorted(waited, key=lambda t: (waited[t], t)):
            if len(self.loading) >= self.workers:
                break
            day = min(d for t, d in self.pending if t == target)
            files = self.pending.pop((target, day))
            if self.skip_read(files):
                continue
            task = TableTask(
                self.tables[target],
                "streaming",
                sorted(files.keys),
                sorted(files.receipts),
                None,
                lambda level, message: self.lines.put((level, message)),
                self.settings.staleness_of(self.tables[target]),
                self.states,
            )
            load = _Load(files, task)
            self.loading[pool.submit(self.load_and_settle, load, day)] = load

    def load_and_settle(self, load: _Load, day: str) -> TableTask:
        """In a pool thread: the table's load, then its settling (dead letters, acknowledgements) - the run's thread
        only reports it, so it goes on taking orders and starting loads meanwhile."""
        load.started_at = time.time()
        try:
            task = load.task.run(self.landing, self.s3, self.bq, self.write, [day])
            load.result = settle(
                task, self.landing, self.sqs, _QueuedLog(self.lines), self.settings.load_job_cap_per_table_day
            )
        finally:  # acknowledged; or the load failed and its messages come back after their timeout
            self.invisible.drop(load.files.receipts)
        return task

    def finish(self, future: Future[TableTask]) -> None:
        load = self.loading.pop(future)
        try:
            task = future.result()
            self.remember(load.files.target, task)
            self.submit_report(self.report, load, task)
        except Exception as exc:  # this load stops; its messages come back and load again (then dead-letter)
            self.forget(load.files.target)
            self.failures += 1
            self.context.log.error(f"{load.task.table.source}: {exc}")
            self.alert(load.task.table, exc)

    def alert(self, table: TableMapping, exc: Exception) -> None:
        """A failed load is alerted as a failed run is, at most once per ALERT_REPEAT_S per table while it fails
        (its files come back every visibility timeout)."""
        now = time.monotonic()
        if now - self.alerted.get(table.target, -ALERT_REPEAT_S) < ALERT_REPEAT_S:
            return
        self.alerted[table.target] = now
        self.alerts.post(
            "CDC load failed",
            [
                f"{table.source} -> {table.target} (stream run {self.context.run_id[:8]}): {exc}",
                "its files come back through SQS and load again; after the queue's max receive count they go to "
                "the dead-letter queue",
            ],
            self.context.log,
        )

    def report(self, load: _Load, task: TableTask) -> None:
        """After a table's load (settled as in a load run, by its pool thread): materialized in the partition of its
        files' day."""
        metadata = load.result.metadata if load.result is not None else None
        # when the sensor ordered the files and when their load began: where a change's time after landing went
        timings = {"load_started_at": dg.MetadataValue.timestamp(load.started_at)}
        if load.files.ordered_at:
            timings["ordered_at"] = dg.MetadataValue.timestamp(load.files.ordered_at)
        self.context.log_event(
            dg.AssetMaterialization(
                asset_key=bigquery_asset_key(task.table),
                partition=load.files.day,
                metadata={**(metadata or {}), **timings},
            )
        )
        self.loads += 1

    def submit_report(self, report: Callable[..., None], *args: Any) -> None:
        """Run `report` on the reporter thread; a report that failed (the instance's storage out of reach) fails
        the run here, as it did on the run's thread (its loaded files' messages are acknowledged: nothing to load
        again; the next stream run takes over)."""
        for done in [f for f in self.reports if f.done()]:
            self.reports.remove(done)
            done.result()
        self.reports.append(self.reporter.submit(report, *args))

    def show_lines(self) -> None:
        while not self.lines.empty():
            level, message = self.lines.get()
            getattr(self.context.log, level)(message)

    def run(self) -> None:
        self.beat()
        started = time.monotonic()
        with self.invisible, ThreadPoolExecutor(max_workers=self.workers) as pool:
            yielded: set[str] = set()
            superseded = False
            looked = took = 0.0
            while True:
                self.beat()
                taking = time.monotonic() < self.deadline
                # the loop also turns at each load's end: orders are read at most every POLL_SECONDS
                if taking and time.monotonic() - took >= POLL_SECONDS:
                    self.take_orders()
                    took = time.monotonic()
                if time.monotonic() - looked >= LOOK_AROUND_EVERY_S:  # the other runs (a few queries)
                    yielded, superseded = self.look_around()
                    looked = time.monotonic()
                if superseded and yielded >= set(self.tables) and not self.loading:
                    taking = False  # the next stream run has taken every table over
                self.start_loads(pool, yielded)
                if self.loading:
                    done, _ = wait(self.loading, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                    for future in done:
                        self.finish(future)
                else:
                    time.sleep(POLL_SECONDS)
                if not self.lines.empty():
                    self.submit_report(self.show_lines)
                if not taking and not self.loading:
                    self.take_orders()  # what the sensor sent meanwhile goes back to SQS, for the next run
                    self.drop_pending()
                    break
        self.acks.shutdown(wait=True)
        self.reporter.shutdown(wait=True)
        for report in self.reports:
            report.result()
        self.show_lines()
        self.context.log.info(
            f"stream run done after {time.monotonic() - started:.0f} s: {self.loads} load(s) of "
            f"{len(self.tables)} table(s), {self.failures} failed (their files come back through SQS), "
            f"{self.skipped} order(s) of files read already acknowledged without a load"
        )


def build_stream_job(mappings: Mappings, settings: Settings) -> dg.JobDefinition:
    tables = {t.target: t for _, t in mappings.tables()}
    names = table_names(tables.values())
    step_settings = LoadStepSettings(
        settings.max_parallel_loads,
        settings.max_load_jobs_per_table_per_day,
        settings.load_mode,
        settings.max_staleness_minutes,
    )

    @dg.op(
        name=STREAM_OP,
        description="Loads streaming-mode tables as the SQS sensor's orders name their files, for the configured "
        "minutes; one materialization per load.",
    )
    def stream_tables(
        context: dg.OpExecutionContext,
        config: StreamRunConfig,
        landing: LandingResource,
        bigquery: BigQueryCdcResource,
        alerts: AlertWebhookResource,
    ) -> None:
        unknown = sorted(set(config.tables) - set(tables))
        if unknown:
            raise dg.Failure(description=f"stream run config names unmapped tables: {unknown}")
        StreamRun(context, config, landing, bigquery, alerts, tables, step_settings, names).run()

    @dg.job(
        name=STREAM_JOB,
        description="A standing stream run: loads streaming-mode tables within seconds of their files landing "
        "(started and replaced by the standing_stream_run sensor when CDC_STREAM_RUN_MINUTES is set).",
        tags={STREAM_RUN_TAG: "true"},
    )
    def stream_landed_files() -> None:
        stream_tables()

    return stream_landed_files


def streamed_targets(mappings: Mappings, settings: Settings) -> list[str]:
    """The tables stream runs load: the streaming-mode ones."""
    return sorted(
        t.target for _, t in mappings.tables() if (t.load_mode or settings.load_mode) == "streaming"
    )
