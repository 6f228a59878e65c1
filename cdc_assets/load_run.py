"""One load step: the landed files of the run's tables, loaded in parallel threads, each table in its load mode
(streaming: `stream_loader`; batch: `batch_loader`); one materialization per table loaded (a batch-mode table's
with its inline duplicate check), and the SQS messages of its files acknowledged only after its load. A table that fails does not stop the others: the step fails at the end naming
each failed table and its error (its messages come back and are retried, then dead-lettered). A table with no
files named is a backfill: it is rebuilt from every file landed on the run's days.
"""

from __future__ import annotations

import datetime as dt
import math
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow.compute as pc
from pydantic import Field

from cdc.landing import ControlDocuments, table_prefix
from cdc.mappings import TableMapping
from cdc.progress import Progress
from cdc_assets.batch_loader import LoadResult, MergeLoader
from cdc_assets.landed_files import read_landed
from cdc_assets.lineage import bigquery_asset_key
from cdc_assets.resources import BigQueryCdcResource, LandingResource
from cdc_assets.stream_loader import STATE_ROOT, StreamLoader, StreamResult, StreamState
from cdc_assets.targets import COMMIT_TS
from cdc_assets.writers import POLL_SECONDS, HandOver

LOADER = "load_landed_files"  # the step (op) that materializes every BigQuery table asset
NO_DUPLICATES = "no_duplicate_changes"


class TableFilesConfig(dg.Config):
    keys: list[str] = Field(default_factory=list, description="Landed S3 keys to load.")
    acknowledge: list[str] = Field(
        default_factory=list,
        description="SQS receipt handles to delete once the files are loaded (set by the sensor).",
    )


class LoadFilesConfig(dg.Config):
    tables: dict[str, TableFilesConfig] = Field(
        default_factory=dict,
        description="Per BigQuery target `dataset.table`: the files to load (set by the SQS sensor). A selected "
        "table not named here is rebuilt from every file landed on the partition's days (a backfill).",
    )


def load_run_config(files: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, Any]:
    """Run config of a load run: per target `dataset.table`, (S3 keys, SQS receipt handles)."""
    tables = {
        target: {"keys": sorted(keys), "acknowledge": sorted(receipts)}
        for target, (keys, receipts) in sorted(files.items())
    }
    return {"ops": {LOADER: {"config": {"tables": tables}}}}


def landed_keys_for_day(
    landing: LandingResource, table: TableMapping, day: dt.date, s3: Any = None
) -> list[str]:
    """CDC files in the day's folder, and full-load files written that day."""
    s3 = s3 or landing.s3()
    base = table_prefix(landing.prefix, table.source_schema, table.source_table)
    keys: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=landing.bucket, Prefix=f"{base}{day:%Y/%m/%d}/"):
        keys += [item["Key"] for item in page.get("Contents", [])]
    for page in paginator.paginate(Bucket=landing.bucket, Prefix=f"{base}LOAD"):
        keys += [item["Key"] for item in page.get("Contents", []) if item["LastModified"].date() == day]
    return sorted(keys)


# -- materialization metadata ----------------------------------------------------------------------------------


def latency_metadata(commit_times: Sequence[dt.datetime | None], now: dt.datetime) -> dict[str, float]:
    """How far behind the source the table is (its newest loaded commit) and commit -> load latency of the batch."""
    seconds = sorted((now - t).total_seconds() for t in commit_times if t is not None)
    if not seconds:
        return {}
    return {
        "lag_s": round(seconds[0], 3),
        "latency_p50_s": round(statistics.median(seconds), 3),
        "latency_p95_s": round(seconds[math.ceil(0.95 * len(seconds)) - 1], 3),  # nearest rank
        "latency_max_s": round(seconds[-1], 3),
    }


def quota_metadata(load_jobs_today: int, cap_per_table_day: int, now: dt.datetime) -> dict[str, Any]:
    """Load jobs used today by this table, and where that projects to by the end of the UTC day."""
    elapsed = (now - now.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
    return {
        "load_jobs_today": load_jobs_today,
        "projected_load_jobs_today": round(load_jobs_today * 86400 / max(elapsed, 600)),
        "load_job_cap_per_table_day": cap_per_table_day,
    }


def duplicate_check(table: TableMapping, changes: int, duplicates: int, scope: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=bigquery_asset_key(table),
        check_name=NO_DUPLICATES,
        passed=duplicates == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "changes": changes,
            "duplicated_changes": duplicates,
            "scope": scope,
            "changelog": f"{table.target_dataset}.{table.changelog_table if table.primary_key else table.target_table}",
        },
    )


def acknowledge(sqs: Any, queue_url: str, receipts: list[str], log: Any) -> int:
    """Delete the SQS messages of loaded files, ten per call. An expired handle is harmless: the message comes back,
    and its rerun finds the batch already merged and only deletes it."""
    done = 0
    for start in range(0, len(receipts), 10):
        entries = [{"Id": str(n), "ReceiptHandle": r} for n, r in enumerate(receipts[start : start + 10])]
        answer = sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        done += len(answer.get("Successful", []))
        for failed in answer.get("Failed", []):
            log.warning(
                f"SQS did not delete a loaded file's message ({failed.get('Code')}: {failed.get('Message')}); it "
                "will return and its rerun only deletes it"
            )
    return done


def set_visibility(sqs: Any, queue_url: str, receipts: Sequence[str], seconds: float) -> list[dict[str, Any]]:
    """Make messages visible again after `seconds` (0: now, for another consumer), ten per call; the entries SQS
    refused, each with its receipt handle. A refused handle loses nothing: its message was deleted (a run loaded its
    file and acknowledged it) or received again (its handle expired; it comes back), so the caller goes on with the
    rest - stopping there would leave the messages already changed invisible and forgotten."""
    timeout = int(min(43_200, max(0, seconds)))
    failed: list[dict[str, Any]] = []
    for start in range(0, len(receipts), 10):
        batch = list(receipts[start : start + 10])
        entries = [
            {"Id": str(n), "ReceiptHandle": r, "VisibilityTimeout": timeout} for n, r in enumerate(batch)
        ]
        for entry in sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries).get(
            "Failed", []
        ):
            failed.append({**entry, "ReceiptHandle": batch[int(entry["Id"])]})
    return failed


KEEP_INVISIBLE_EVERY_S = 20.0
KEEP_INVISIBLE_FOR_S = 60.0  # each renewal: at least the time to the next one and a margin


class KeptInvisible:
    """The messages of the files a run holds, kept invisible until it acknowledges or gives them back. A table's wait
    for its earlier run plus a batch load (a load job and a MERGE) can outlast the queue's visibility timeout; a
    message that came back would be received again and its file read a second time (adding nothing), and SQS may
    ignore the delete of the first handle. Renewed on a thread of its own every `every` seconds, from the start;
    a handle SQS refuses (its message deleted or received again) is dropped. If the run's process dies, the renewals
    stop and the messages come back within `seconds`."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        log: Callable[[str], None],
        every: float = KEEP_INVISIBLE_EVERY_S,
        seconds: float = KEEP_INVISIBLE_FOR_S,
    ) -> None:
        self.sqs, self.queue_url, self.log = sqs, queue_url, log
        self.every, self.seconds = every, seconds
        self.receipts: set[str] = set()
        # a renewal call and a drop never interleave: a message dropped (given back: visible now) is not renewed
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._renew_until_stopped, name="keep-invisible", daemon=True)

    def keep(self, receipts: Iterable[str]) -> None:
        with self.lock:
            self.receipts.update(receipts)

    def drop(self, receipts: Iterable[str]) -> None:
        """Renew these no more (acknowledged, given back, or to come back after their timeout)."""
        with self.lock:
            self.receipts.difference_update(receipts)

    def renew(self) -> None:
        """Ten at a time, each call under the lock (a keep or drop waits for one call at most)."""
        with self.lock:
            receipts = sorted(self.receipts)
        for start in range(0, len(receipts), 10):
            with self.lock:
                batch = [r for r in receipts[start : start + 10] if r in self.receipts]
                if not batch:
                    continue
                # SQS out of reach: tried again at the next renewal; meanwhile they may come back
                try:
                    failed = set_visibility(self.sqs, self.queue_url, batch, self.seconds)
                except Exception as exc:
                    self.log(
                        f"could not keep {len(receipts)} held message(s) invisible ({exc}); trying again"
                    )
                    return
                self.receipts.difference_update(entry["ReceiptHandle"] for entry in failed)

    def _renew_until_stopped(self) -> None:
        while True:
            self.renew()
            if self.stopped.wait(self.every):
                return

    def __enter__(self) -> KeptInvisible:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


# -- one table's part of a run ---------------------------------------------------------------------------------


def write_api_metadata(usage: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    """Storage Write API calls and bytes of this table today (UTC), and where they project to by the day's end: what
    streaming mode spends instead of load jobs (docs/design.md, "Quotas")."""
    elapsed = max((now - now.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds(), 600)
    return {
        "write_api_calls_today": int(usage.get("calls", 0)),
        "write_api_bytes_today": int(usage.get("bytes", 0)),
        "write_streams_created_today": int(usage.get("streams", 0)),
        "projected_write_api_calls_today": round(int(usage.get("calls", 0)) * 86400 / elapsed),
        "projected_write_api_bytes_today": round(int(usage.get("bytes", 0)) * 86400 / elapsed),
    }


@dataclass
class TableTask:
    """One table's part of a load run, done in a worker thread: S3 and BigQuery only (SQS, logging and Dagster
    events stay on the step's thread)."""

    table: TableMapping
    mode: str  # "streaming" or "batch"
    keys: list[str]
    receipts: list[str]
    rebuild_id: str | None  # set for a backfill: the run's id
    log: Callable[[str, str], None]  # (level, message), shown in the run's log by the step's thread
    max_staleness_minutes: float = 0.0
    states: dict[str, StreamState] | None = None  # a stream run's table states between loads (StreamLoader)
    result: LoadResult | None = None
    streamed: StreamResult | None = None
    unreadable: dict[str, str] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    commit_times: list[Any] = field(default_factory=list)
    duplicates: tuple[int, int] = (0, 0)  # (changes, duplicated) when no batch was merged
    load_jobs_today: int = 0

    def run(
        self, landing: LandingResource, s3: Any, bq: Any, write: Any, partition_keys: Sequence[str]
    ) -> TableTask:
        if not self.keys and self.rebuild_id:  # a backfill: rebuild the partition's days from their files
            for partition in partition_keys:
                self.keys += landed_keys_for_day(landing, self.table, dt.date.fromisoformat(partition), s3)
        if self.mode == "streaming":
            return self._stream(landing, s3, bq, write, partition_keys)
        return self._merge(landing, s3, bq, partition_keys)

    def _stream(
        self, landing: LandingResource, s3: Any, bq: Any, write: Any, partition_keys: Sequence[str]
    ) -> TableTask:
        control = ControlDocuments(s3, landing.bucket, landing.prefix, root=STATE_ROOT)
        loader = StreamLoader(bq, write, self.table, control, self.max_staleness_minutes, self.states)
        if self.rebuild_id:
            on_file = self._backfill_progress(partition_keys)
            self.streamed = loader.rebuild(
                s3, landing.bucket, self.keys, self.sizes, self.unreadable, on_file
            )
        else:
            self.streamed = loader.load(
                s3, landing.bucket, landing.prefix, self.keys, self.sizes, self.unreadable
            )
        self.commit_times = self.streamed.commit_times
        return self

    def _merge(self, landing: LandingResource, s3: Any, bq: Any, partition_keys: Sequence[str]) -> TableTask:
        loader = MergeLoader(bq, self.table)
        versions: dict[str, str] = {}
        data = None
        rest: list[str] = []
        if self.keys:
            on_file = self._backfill_progress(partition_keys) if self.rebuild_id else None
            data = read_landed(
                s3, landing.bucket, self.keys, self.sizes, self.unreadable, on_file, versions, rest
            )
        self.keys = [key for key in self.keys if key not in self.unreadable and key not in rest]
        while (
            rest and data is not None
        ):  # a type change between the batch's files: those before it load first,
            loader.load(data, self.keys, rebuild_id=self.rebuild_id, versions=versions)
            self.keys, rest = rest, []  # then the rest, whose loading names the change
            data = read_landed(s3, landing.bucket, self.keys, versions=versions, rest=rest)
            self.keys = [key for key in self.keys if key not in rest]
        if data is None:
            self.duplicates = loader.duplicate_changes()
            self.load_jobs_today = loader.load_jobs_on(dt.datetime.now(dt.UTC).date())
            return self
        self.commit_times = pc.unique(data[COMMIT_TS]).to_pylist()
        self.result = loader.load(data, self.keys, rebuild_id=self.rebuild_id, versions=versions)
        if self.result.skipped:
            self.load_jobs_today = loader.load_jobs_on(dt.datetime.now(dt.UTC).date())
        else:
            self.load_jobs_today = self.result.load_jobs_today
        return self

    def _backfill_progress(self, partition_keys: Sequence[str]) -> Callable[[int], None]:
        """A backfill may read many files: a progress line every ~10 % of them."""
        progress = Progress(f"backfill of {self.table.source} {list(partition_keys)} (files)", len(self.keys))
        step = max(1, len(self.keys) // 10)

        def on_file(_rows: int) -> None:
            line = progress.advance(1)
            if progress.done % step == 0 or progress.done == len(self.keys):
                self.log("info", line)

        return on_file

    def materialization(self, acknowledged: int, cap_per_table_day: int) -> dg.MaterializeResult:
        now = dt.datetime.now(dt.UTC)
        metadata: dict[str, Any] = {
            "load_mode": self.mode,
            "messages_acknowledged": acknowledged,
            "dead_lettered_files": len(self.unreadable),
        }
        checks: list[dg.AssetCheckResult] = []
        if self.streamed is not None:
            metadata.update(self._stream_metadata(self.streamed, now))
        else:
            metadata.update(quota_metadata(self.load_jobs_today, cap_per_table_day, now))
            metadata.update(self._merge_metadata(now))
            checks = [self._duplicate_check()]
        return dg.MaterializeResult(
            asset_key=bigquery_asset_key(self.table), metadata=metadata, check_results=checks
        )

    def _stream_metadata(self, streamed: StreamResult, now: dt.datetime) -> dict[str, Any]:
        return {
            "files": streamed.files,
            "bytes": sum(self.sizes),
            "rows": streamed.rows,
            "new_changes": streamed.inserted_changes,
            **{f"rows_{op}": count for op, count in sorted(streamed.rows_by_op.items())},
            "write_api_calls": streamed.write_calls,
            "write_api_bytes": streamed.write_bytes,
            "append_s": streamed.append_s,
            "load_phases_s": streamed.phases_s,
            "stream_resynced": streamed.resynced,
            "rebuild": self.rebuild_id is not None,
            **latency_metadata(self.commit_times, now),
            **write_api_metadata(streamed.usage, now),
        }

    def _merge_metadata(self, now: dt.datetime) -> dict[str, Any]:
        result = self.result
        if result is None:
            return {"files": 0, "rows": 0}
        return {
            "files": result.files,
            "bytes": sum(self.sizes),
            "rows": result.rows,
            "new_changes": result.inserted_changes,
            **{f"rows_{op}": count for op, count in sorted(result.rows_by_op.items())},
            "bigquery_jobs": result.jobs,
            "load_jobs": result.load_jobs,
            "stage_s": result.stage_s,
            "merge_s": result.merge_s,
            "rebuild": self.rebuild_id is not None,
            **latency_metadata(self.commit_times, now),
        }

    def _duplicate_check(self) -> dg.AssetCheckResult:
        result = self.result
        if result is None:
            return duplicate_check(self.table, *self.duplicates, scope="whole changelog")
        if result.skipped:
            return duplicate_check(self.table, 0, 0, scope="batch merged before: nothing added")
        return duplicate_check(
            self.table, result.batch_changes, result.duplicated_changes, scope="this batch"
        )

    @property
    def routine(self) -> bool:
        """A streaming load with nothing to remark (no rebuild, no resync): its materialization's metadata says what
        it did, and the run logs one line for all of them (a log event per table costs a storage write each)."""
        return self.streamed is not None and not self.rebuild_id and not self.streamed.resynced

    def summary(self) -> str:
        if self.streamed is not None:
            done = self.streamed
            return (
                f"{self.table.source} -> {done.table} (streaming): {done.files} file(s), {done.rows} row(s), "
                f"{done.inserted_changes} new change(s), {done.write_calls} Write API call(s)"
                + (" (rebuild)" if self.rebuild_id else "")
                + (", stream re-synchronised from BigQuery" if done.resynced else "")
            )
        result = self.result
        if result is None:
            return f"{self.table.source}: no readable landed files"
        return (
            f"{self.table.source} -> {result.table}: {result.files} file(s), {result.rows} row(s), "
            f"{result.inserted_changes} new change(s), {result.jobs} job(s)"
            + (" (rebuild)" if self.rebuild_id else "")
            + (" - this file set was loaded before, nothing to do" if result.skipped else "")
        )


# -- the step --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadStepSettings:
    max_parallel_loads: int
    load_job_cap_per_table_day: int
    load_mode: str = "streaming"  # for tables whose mapping does not say
    max_staleness_minutes: float = 0.0

    def mode_of(self, table: TableMapping) -> str:
        return table.load_mode or self.load_mode

    def staleness_of(self, table: TableMapping) -> float:
        return (
            table.max_staleness_minutes
            if table.max_staleness_minutes is not None
            else self.max_staleness_minutes
        )


def load_selected_tables(
    context: dg.AssetExecutionContext,
    config: LoadFilesConfig,
    landing: LandingResource,
    bigquery: BigQueryCdcResource,
    by_key: Mapping[dg.AssetKey, TableMapping],
    settings: LoadStepSettings,
    names: Mapping[str, dg.AssetKey],
) -> Iterator[dg.MaterializeResult]:
    """The load step's body: the run's selected tables, loaded in parallel threads (a load mostly waits)."""
    selected = [by_key[key] for key in sorted(context.selected_asset_keys, key=lambda k: k.path)]
    unselected = sorted(set(config.tables) - {t.target for t in selected})
    if unselected:
        raise dg.Failure(description=f"run config names tables this run does not select: {unselected}")
    lines: queue.Queue[tuple[str, str]] = queue.Queue()
    tasks = [_task(context, config, table, lines, settings) for table in selected]
    # one client each for the run's threads: clients are thread-safe, creating them concurrently is not
    s3, sqs, bq = landing.s3(), landing.sqs(), bigquery.client()
    write = bigquery.write_client() if any(t.mode == "streaming" for t in tasks) else None
    invisible = KeptInvisible(sqs, landing.queue_url, lambda message: lines.put(("warning", message)))
    invisible.keep(r for task in tasks for r in task.receipts)
    failures: list[str] = []
    # each table loads as soon as no earlier run holds it (docs/design.md, "Sensor")
    hand_over = HandOver(context.instance, context.run_id, names, context.log.info)
    waiting = {bigquery_asset_key(task.table): task for task in tasks}
    started = time.monotonic()

    def show_lines() -> None:
        while not lines.empty():
            level, message = lines.get()
            getattr(context.log, level)(message)

    with invisible, ThreadPoolExecutor(max_workers=min(settings.max_parallel_loads, len(tasks)) or 1) as pool:
        pending: dict[Future[TableTask], TableTask] = {}
        while waiting or pending:
            if waiting:
                for asset in hand_over.free(list(waiting)):
                    task = waiting.pop(asset)
                    pending[pool.submit(task.run, landing, s3, bq, write, context.partition_keys)] = task
                if not waiting and time.monotonic() - started >= 1:
                    context.log.info(
                        f"the earlier run(s) handed over the last table after {time.monotonic() - started:.1f} s"
                    )
            if not pending:
                time.sleep(POLL_SECONDS)
                continue
            done, _ = wait(pending, timeout=POLL_SECONDS if waiting else 0.5, return_when=FIRST_COMPLETED)
            show_lines()
            for future in done:
                task = pending.pop(future)
                try:
                    future.result()
                except Exception as exc:  # this table stops; the others go on
                    invisible.drop(task.receipts)  # its messages come back after their timeout
                    failures.append(f"{task.table.target}: {exc}")
                    context.log.error(f"{task.table.source}: {exc}")
                    continue
                try:
                    yield _finish(context, task, landing, sqs, settings)
                finally:
                    invisible.drop(task.receipts)
    show_lines()
    routine = [t.streamed for t in tasks if t.routine and t.streamed is not None]
    if routine:
        context.log.info(
            f"{len(routine)} table(s) streamed in {time.monotonic() - started:.1f} s: "
            f"{sum(r.files for r in routine)} file(s), {sum(r.rows for r in routine)} row(s), "
            f"{sum(r.inserted_changes for r in routine)} new change(s) (per table: each materialization's metadata)"
        )
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} of {len(tasks)} table(s) failed to load (the others were loaded): "
            + " | ".join(failures)
        )


def _task(
    context: dg.AssetExecutionContext,
    config: LoadFilesConfig,
    table: TableMapping,
    lines: queue.Queue[tuple[str, str]],
    settings: LoadStepSettings,
) -> TableTask:
    files = config.tables.get(table.target)
    return TableTask(
        table,
        settings.mode_of(table),
        list(files.keys) if files else [],
        list(files.acknowledge) if files else [],
        None if files else context.run.run_id,  # not named: a backfill rebuilds its days
        lambda level, message: lines.put((level, message)),
        settings.staleness_of(table),
    )


def _finish(
    context: dg.AssetExecutionContext,
    task: TableTask,
    landing: LandingResource,
    sqs: Any,
    settings: LoadStepSettings,
) -> dg.MaterializeResult:
    """After a table's load: `settle` it; its inline check only if the run selected it."""
    result = settle(task, landing, sqs, context.log, settings.load_job_cap_per_table_day)
    asset_key = bigquery_asset_key(task.table)
    if (
        result.check_results
        and dg.AssetCheckKey(asset_key, NO_DUPLICATES) not in context.selected_asset_check_keys
    ):
        result = dg.MaterializeResult(asset_key=asset_key, metadata=result.metadata)
    return result


def settle(
    task: TableTask, landing: LandingResource, sqs: Any, log: Any, cap_per_table_day: int
) -> dg.MaterializeResult:
    """After a table's load: dead-letter its unreadable files, acknowledge its messages, report it."""
    for key, reason in task.unreadable.items():
        log.error(f"{reason}; moved to the dead-letter queue, the other files are loaded")
        landing.dead_letter_file(
            key, f"{reason}. Replace or delete the file, then redrive this message or backfill its day"
        )
    acknowledged = acknowledge(sqs, landing.queue_url, task.receipts, log)
    if not task.routine:
        log.info(task.summary())
    return task.materialization(acknowledged, cap_per_table_day)
