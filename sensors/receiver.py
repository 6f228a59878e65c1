"""Receiving landed files' S3 events from SQS, for the SQS sensor (`sensors.sqs_sensor`; docs/design.md, "Sensor"):
a tick's receive (several receive calls at once, taking a capture flush's files and no more), the files a message
names, and the continuous receiver.

The continuous receiver is a thread of the code server that, while a stream run takes orders, receives all the time
and orders the files of the tables that run may load to it as soon as they land - not when the sensor's next tick
gets to them (Dagster's daemon starts a tick at most every 5 s). Whatever else it receives (files of tables another run
holds or that load in batch mode, messages it cannot read) it keeps for that next tick, which treats them as received
by itself. The tick starts it, renews its lease and takes what it kept; without a tick for LEASE_SECONDS (the sensor
stopped, the code server going away) it stops receiving and makes what it kept visible again. It reads where files go
(`Route`) through the sensor's own planning at most every ROUTE_SECONDS, so that a table another run takes over is
held by the sensor instead of being ordered to the stream run and given back. One per queue and process: the stream
run's order ring has one writer, the tick's orders go through it too (`Receiver.order`).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dagster as dg

from cdc.landing import NotALandingFile, ParsedMessage, PoisonMessage, parse_key, parse_message
from cdc.mappings import Mappings, TableMapping
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.load_run import set_visibility
from cdc_assets.resources import LandingResource
from cdc_assets.stream_run import ORDER_SLOTS, TableFiles, send_order

MAX_MESSAGES_PER_TICK = 1000
RECEIVERS = 4  # receive calls in flight at once
# Once messages arrive, a receive also takes those that follow within QUIET_SECONDS of the last one (the rest of a
# capture flush's files, uploaded at once), for at most SETTLE_SECONDS while receives come back partly empty, and
# never takes messages past `collect_seconds` after it began (COLLECT_SECONDS for a tick: receives that keep coming
# back full, a backlog or many tables' flushes landing in bursts), up to MAX_MESSAGES_PER_TICK. (A tick that drained
# on for 20 s held every file it took for those 20 s: 18.8 s pickup at 1x.) RECEIVERS receive calls are in flight at
# once: one at a time took fewer files than 70 tables land at 1x when the local SQS answered slowly.
QUIET_SECONDS = 0.3
SETTLE_SECONDS = 1.5
COLLECT_SECONDS = 3.5

# The continuous receiver: each receive long-polls up to WAIT_SECONDS for a first message and orders what it took
# at most ORDER_EVERY_SECONDS after it arrived (a flush's files in one order, not ten).
WAIT_SECONDS = 1
ORDER_EVERY_SECONDS = 0.5
LEASE_SECONDS = 15.0  # renewed by every tick; ticks come every 5 s, 10 s when the daemon is late
ROUTE_SECONDS = 1.0  # how old the route the receiver orders by may be


class UnmappedTable(ValueError):
    """A landed file of a table that is not in the mappings (or is disabled)."""


NOT_LOADABLE = (PoisonMessage, NotALandingFile, UnmappedTable)  # what `landed_files` raises: dead letters


def message_day(message: dict[str, Any]) -> dt.date:
    sent = int(message.get("Attributes", {}).get("SentTimestamp", time.time() * 1000))
    return dt.datetime.fromtimestamp(sent / 1000, dt.UTC).date()


def landed_files(
    message: dict[str, Any], prefix: str, by_source: dict[tuple[str, str], TableMapping]
) -> tuple[ParsedMessage, list[tuple[TableMapping, str, str]]]:
    """The message, and the (table, UTC day, key) of each file it announces (none: a TestEvent or a deletion).
    Raises PoisonMessage (not an S3 event), NotALandingFile or UnmappedTable, each naming what and why."""
    parsed = parse_message(message)
    if parsed.test_event or not parsed.keys:
        return parsed, []
    files = []
    for key in parsed.keys:
        landed = parse_key(key, prefix)
        table = by_source.get((landed.schema, landed.table))
        if table is None:
            raise UnmappedTable(
                f"{key}: table {landed.schema}.{landed.table} is not in the mappings (or disabled); add it to its "
                "cluster's mapping file or stop capturing it. Message moved to the dead-letter queue"
            )
        files.append((table, (landed.day or message_day(message)).isoformat(), key))
    return parsed, files


class _Receiving:
    """The messages of one receive, taken by RECEIVERS threads at once: a receive from a busy local SQS (or a busy
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
    sqs: Any,
    queue_url: str,
    wait_seconds: int = 0,
    collect_seconds: float = COLLECT_SECONDS,
    from_first: bool = False,
) -> list[dict[str, Any]]:
    """One receive's messages: the first call waits up to `wait_seconds` for one; then RECEIVERS threads take what
    is there and what follows closely (the rules above COLLECT_SECONDS), never past `collect_seconds` after the first
    call began (or, `from_first`, after the first message came)."""
    receiving = _Receiving(sqs, queue_url, collect_seconds)
    if not receiving.receive(wait_seconds):
        return []
    if from_first:
        receiving.began = receiving.first_at
    with ThreadPoolExecutor(max_workers=RECEIVERS) as pool:
        for done in [pool.submit(receiving.receiver) for _ in range(RECEIVERS)]:
            done.result()
    return receiving.messages


# -- the continuous receiver -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where landed files go, as the sensor plans it: the stream run taking orders (if any), the tables it streams and
    the tables other runs hold (their files wait in the sensor's cursor)."""

    stream: dg.RunRecord | None
    streamed: frozenset[dg.AssetKey]
    held: frozenset[dg.AssetKey]
    streaming_targets: frozenset[str]  # the tables in streaming mode by the mappings

    def orders(self, table: TableMapping) -> bool:
        """Whether the table's files go to the stream run now."""
        key = bigquery_asset_key(table)
        return (
            self.stream is not None
            and table.target in self.streaming_targets
            and key in self.streamed
            and key not in self.held
        )


class Receiver:
    """The continuous receiver of one queue (see the module's docstring)."""

    def __init__(
        self,
        landing: LandingResource,
        mappings: Mappings,
        instance: dg.DagsterInstance,
        plan: Callable[[dg.DagsterInstance], Route],
        route: Route,
        slot: int,
    ) -> None:
        self.landing = landing
        self.mappings = mappings
        self.instance = instance
        self.slot = slot % ORDER_SLOTS  # the next slot of the stream run's order ring
        self._plan = plan
        self._route = route
        self._routed_at = time.monotonic()
        self._sqs = landing.sqs()
        self._by_source = {(t.source_schema, t.source_table): t for _, t in mappings.tables()}
        self._lock = threading.Lock()  # what it keeps, its lines and counts, the order ring's slot
        self._route_lock = threading.Lock()  # the sensor's planning: one at a time
        self._kept: list[dict[str, Any]] = []
        self._lines: list[tuple[str, str]] = []
        self._ordered_files = 0
        self._ordered_tables: set[str] = set()
        self._lease_until = time.monotonic() + LEASE_SECONDS
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdc-sqs-receiver", daemon=True)

    # -- what the tick calls

    def start(self) -> Receiver:
        """Start receiving, as the one receiver of its queue in this process (`running`)."""
        with _RUNNING_LOCK:
            self._thread.start()
            _RUNNING[self.landing.queue_url] = self
        return self

    def alive(self) -> bool:
        """Receiving, and will go on until its lease runs out (a receiver past it only gives back what it kept)."""
        return (
            self._thread.is_alive() and not self._stopping.is_set() and time.monotonic() < self._lease_until
        )

    def renew(self) -> None:
        self._lease_until = time.monotonic() + LEASE_SECONDS

    def route(self, fresh: bool = False) -> Route:
        """The route files go by, planned again if older than ROUTE_SECONDS (or `fresh`)."""
        with self._route_lock:
            if fresh or time.monotonic() - self._routed_at >= ROUTE_SECONDS:
                self._route = self._plan(self.instance)
                self._routed_at = time.monotonic()
            return self._route

    def take(self) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int, int]:
        """(the messages kept for the tick, log lines, files and tables ordered) since the last call."""
        with self._lock:
            taken = self._kept, self._lines, self._ordered_files, len(self._ordered_tables)
            self._kept, self._lines, self._ordered_files, self._ordered_tables = [], [], 0, set()
            return taken

    def order(self, run_id: str, files: list[TableFiles]) -> None:
        """Write one order into the stream run's ring (the receiver's and the tick's orders, one slot each)."""
        with self._lock:
            send_order(self.instance, run_id, self.slot, files)
            self.slot = (self.slot + 1) % ORDER_SLOTS

    def stop(self) -> list[dict[str, Any]]:
        """Stop receiving (after the receive in flight); the messages it kept, for the caller."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=WAIT_SECONDS + ORDER_EVERY_SECONDS + 30)
        return self.take()[0]

    # -- the thread

    def _line(self, level: str, message: str) -> None:
        with self._lock:
            self._lines.append((level, message))

    def _run(self) -> None:
        failing = False
        while not self._stopping.is_set() and time.monotonic() < self._lease_until:
            try:
                messages = receive_messages(
                    self._sqs, self.landing.queue_url, WAIT_SECONDS, ORDER_EVERY_SECONDS, from_first=True
                )
                self._dispatch(messages)
                failing = False
            # SQS or the instance out of reach: what it received comes back after its visibility timeout, not lost
            except Exception as exc:
                if not failing:
                    self._line(
                        "warning", f"the continuous receiver failed ({exc}); it tries again every second"
                    )
                failing = True
                self._stopping.wait(1.0)
        if not self._stopping.is_set():  # the lease ran out: no tick takes what it kept
            self.give_back(self.take()[0])

    def _dispatch(self, messages: list[dict[str, Any]]) -> None:
        """Order the files of the tables the stream run may load now; keep the rest for the tick."""
        if not messages:
            return
        route = self.route()
        orders: dict[tuple[str, str], TableFiles] = {}
        ordered: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        for message in messages:
            try:
                parsed, files = landed_files(message, self.landing.prefix, self._by_source)
            except NOT_LOADABLE:  # the tick dead-letters it, with its reason in the log
                kept.append(message)
                continue
            if not files or not all(route.orders(table) for table, _, _ in files):
                kept.append(message)
                continue
            ordered.append(message)
            for table, day, key in files:
                order = orders.setdefault((table.target, day), TableFiles(table.target, day))
                order.keys.add(key)
                order.receipts.add(parsed.receipt_handle)
        try:
            if orders and route.stream is not None:
                self.order(route.stream.dagster_run.run_id, list(orders.values()))
                with self._lock:
                    self._ordered_files += sum(len(f.keys) for f in orders.values())
                    self._ordered_tables.update(f.target for f in orders.values())
        except Exception:
            kept += ordered  # not ordered: the tick orders them
            raise
        finally:
            with self._lock:
                self._kept += kept

    def give_back(self, kept: list[dict[str, Any]]) -> None:
        """Make messages visible again now (if SQS is out of reach, after their visibility timeout)."""
        if kept:
            try:
                set_visibility(self._sqs, self.landing.queue_url, [m["ReceiptHandle"] for m in kept], 0)
            except Exception:  # SQS out of reach: they come back after their visibility timeout
                pass


_RUNNING: dict[str, Receiver] = {}  # per queue URL
_RUNNING_LOCK = threading.Lock()


def running(queue_url: str) -> Receiver | None:
    with _RUNNING_LOCK:
        receiver = _RUNNING.get(queue_url)
        return receiver if receiver is not None and receiver.alive() else None


def stop_all() -> None:
    """Stop every receiver of the process, making what they kept visible again (tests; a code server going away)."""
    with _RUNNING_LOCK:
        receivers = list(_RUNNING.values())
        _RUNNING.clear()
    for receiver in receivers:
        receiver.give_back(receiver.stop())
