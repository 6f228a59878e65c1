"""The whole pipeline at the seed's scale and beyond, on this machine, side by side with its peers in one run.

The local platform (6 MariaDB clusters with the 70 demo tables, moto, the BigQuery server, the capture, Dagster) is
brought up in `.state/bench` as a user brings it up. Then the seed-shaped workload (inserts, updates, key changes,
deletes over all 70 tables, one load process per cluster) runs in phases: 1x the seed's rate (40M changed rows a
day = 463 rows/s), 10x, and a burst. Beside it, in the same run and on the same data: the daily batch (copied once
before the phases - last night's copy - and once after) and a scheduled incremental copy on a cursor column
(`bench/peers.py`), on a BigQuery server of their own: the local server applies one write at a time, so their
load jobs and MERGEs would otherwise hold up the pipeline's appends (BigQuery does not serialise the two). Measured:

- end-to-end latency of every change, from its commit in MariaDB to the commit of the BigQuery transaction that
  made it visible in the current-state table (the ledger's `loaded_at`, written in that transaction); MariaDB's
  binlog gives commit times to the second, so the middle of the second is used (+-0.5 s);
- where the time goes, per change: capture (commit -> file written, from the file's DMS name), pickup (-> the
  sensor's run request), queue (-> run started), worker start (-> the loader step started), load (-> visible), and
  the staging load job and merge transaction inside the load (from the materialization metadata);
- rows/s: the workload's, the capture's, the pipeline's; capture against raw binlog decoding of the same binlog
  (one cluster's range of the 10x phase, decoded again both ways after the run, alternating);
- peak memory (PSS: shared pages split between their processes) and CPU seconds of every component (sampled
  from /proc every 0.5 s);
- load jobs per table per day projected from the run, against BigQuery's 1,500 per table and 100,000 per project;
- the peers' latency, cost (jobs, bytes) and correctness (missed inserts, updates, deletes), and ours.

Prints one table, writes `bench/results/pipeline.json` and `bench/results/latency_cdf.png`.

    python -m bench.pipeline_bench [--phase-seconds 90] [--burst-seconds 15] [--peer-interval 120]
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from bench.bench_platform import CDC, ROOT, BenchPlatform, Sampler, stop_leftovers, wait_for
from bench.capture_bench import gtid_numbers
from capture.service import CaptureSettings
from cdc.settings import Settings
from cdc_assets.stream_loader import LOAD_PHASES
from cdc_testing import oracle

RESULTS = ROOT / "bench" / "results"
PUBLISHED = ROOT / "docs" / "benchmarks" / "pipeline.json"  # the run docs/benchmarks.md reports
OWN_COMPONENTS = ("capture (6 clusters)", "Dagster services", "Dagster run workers")  # issue 15's "our own"
SEED_ROWS_PER_S = 40_000_000 / 86_400  # the seed: 40M changed rows a day
WORKLOAD_NICE = 10  # the game servers: they run on machines of their own in production
TABLE_LIMIT, PROJECT_LIMIT = 1_500, 100_000  # BigQuery load jobs per day


@dataclass
class Phase:
    name: str
    multiple: float  # of the seed's rate
    seconds: float
    start: float = 0.0
    end: float = 0.0
    changes: int = 0
    capture_rows: int = 0
    # the capture stopped while the workload writes, then replaying what it wrote (--hold-capture)
    held: bool = False
    caught_up_s: float | None = None  # held: how long the capture's replay took after the workload ended

    @property
    def rate(self) -> float:
        return SEED_ROWS_PER_S * self.multiple


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of `values` (sorted here)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "max": round(max(values), 2),
    }


# -- the load -----------------------------------------------------------------------------------------------------


def workload_role(args: argparse.Namespace) -> None:
    """One cluster's share of a phase, in its own process (its CPU and memory are measured apart)."""
    from cdc.mappings import load_mappings
    from local_stack.demo_schema import demo_clusters
    from local_stack.stack import LocalStack
    from local_stack.workload import Workload

    stack = LocalStack(load_mappings())
    [cluster] = [c for c in demo_clusters() if c.name == args.cluster]

    def connect(demo: Any) -> Any:
        user, password = stack.admin_credentials(demo.name)
        return stack.mariadb(demo.name).connect(user, password)

    # the game servers run on machines of their own in production: here they yield the CPU to the platform first
    os.nice(WORKLOAD_NICE)
    yield_autogroup(os.getpid(), WORKLOAD_NICE)
    driver = Workload(connect, [cluster], seed=args.seed)
    driver.ensure_schemas()
    time.sleep(max(0.0, args.start_at - time.time()))
    report = driver.run(rate=args.rate, duration=args.duration)
    driver.close()
    Path(args.out).write_text(json.dumps({"changes": report.total, "seconds": report.seconds}))


def yield_autogroup(session_leader: int, niceness: int) -> None:
    """The niceness of a session's scheduling group. Linux (with `kernel.sched_autogroup_enabled`, the default on
    Debian) shares the CPU fairly between sessions first, and a process's niceness only counts against the processes of
    its own session; every server here runs in a session of its own. So a niced process in a session of its own took
    as much of the CPU as the Dagster services and run workers together, whatever its niceness: the session's group
    is niced too. No autogroup (another kernel): nothing to do."""
    try:
        Path(f"/proc/{session_leader}/autogroup").write_text(str(niceness))
    except FileNotFoundError:
        return
    except OSError as exc:
        print(
            f"  could not set the CPU share of session {session_leader} ({exc}); measured without it",
            flush=True,
        )


def yield_sources(platform: BenchPlatform, niceness: int) -> None:
    """Every thread of the source MariaDB servers, and their sessions, at `niceness` (a thread they start later
    inherits it from its parent thread): the platform's processes come first for the CPU, as where the sources have
    their own machines."""
    sessions = {pid for name, pid in platform.service_pids().items() if name.startswith("mariadb[")}
    for session in sessions:
        yield_autogroup(session, niceness)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) not in sessions:
                continue
            for task in os.listdir(f"/proc/{entry.name}/task"):
                os.setpriority(os.PRIO_PROCESS, int(task), niceness)
        except (OSError, ValueError):
            continue


def run_phase(
    platform: BenchPlatform, sampler: Sampler, phase: Phase, seed: int, flush: float | None = None
) -> None:
    """The phase's workload, a process per cluster. A held phase stops the capture first and starts it again after
    the workload, waiting until it has captured every cluster's last transaction: its files then land at the rate
    the capture replays (most of the 10x rate), while the workload no longer shares the cores with the loads."""
    clusters = [c.cluster for c in platform.mappings.clusters]
    if phase.held:
        platform.cdc("capture", "stop")
    start_at = time.time() + 8  # every process connected and ready (schemas, keys) before the phase starts
    processes = []
    outputs = []
    for index, cluster in enumerate(clusters):
        out = platform.state / f"workload-{phase.name}-{cluster}.json"
        outputs.append(out)
        argv = [
            sys.executable, "-m", "bench.pipeline_bench", "--role", "workload", "--cluster", cluster,
            "--rate", str(phase.rate / len(clusters)), "--duration", str(phase.seconds),
            "--seed", str(seed * 100 + index), "--start-at", str(start_at), "--out", str(out),
        ]  # fmt: skip
        process = subprocess.Popen(argv, env=platform.env, cwd=ROOT, start_new_session=True)
        sampler.register(process.pid, "workload (6 processes; the game servers)")
        processes.append(process)
    before = 0 if phase.held else capture_rows(platform)  # a capture started again counts from 0
    time.sleep(max(0.0, start_at - time.time()))
    phase.start = start_at
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"the workload of phase {phase.name} failed")
    phase.end = phase.start + phase.seconds
    phase.changes = sum(json.loads(out.read_text())["changes"] for out in outputs)
    if phase.held:
        platform.cdc("capture", "start", *(["--flush-interval", str(flush)] if flush else []))
        wait_for(lambda: captured_clusters(platform) >= set(clusters), "the capture's replay", timeout=900)
        phase.caught_up_s = round(time.time() - phase.end, 1)
        print(
            f"  {phase.name}: the capture replayed it {phase.caught_up_s:.0f} s after the workload",
            flush=True,
        )
    phase.capture_rows = capture_rows(platform) - before
    print(
        f"  {phase.name}: {phase.changes:,} changes in {phase.seconds:.0f} s "
        f"({phase.changes / phase.seconds:,.0f}/s; asked {phase.rate:,.0f}/s)",
        flush=True,
    )


def capture_statuses(platform: BenchPlatform) -> list[dict[str, Any]]:
    """Each cluster's capture status document, read in this process (what `cdc capture status --json` prints: a
    CLI process every poll would take a core's second from the platform while it is measured)."""
    from capture.runner import capture_status

    return capture_status(platform.mappings, Settings.load(platform.stack_env()))


def capture_rows(platform: BenchPlatform) -> int:
    statuses = capture_statuses(platform)
    return sum(sum(v for k, v in s.get("rows", {}).items() if k in ("I", "U", "D")) for s in statuses)


# -- measuring what BigQuery holds --------------------------------------------------------------------------------


def bigquery(platform: BenchPlatform) -> Any:
    from cdc.clients import bigquery_client

    values = platform.stack_env()
    return bigquery_client(values["CDC_BIGQUERY_PROJECT"], endpoint=values["CDC_BIGQUERY_ENDPOINT"])


def changes_and_files(
    platform: BenchPlatform, since: float
) -> tuple[list[tuple[str, float, str, float]], dict[str, Any]]:
    """Every change committed after `since`: (table, commit time, file, visible time); and per table the ledger's
    batches (batch -> first loaded_at) for load-job counts."""
    from cdc_assets.targets import TableTargets

    client = bigquery(platform)
    changes = []
    batches: dict[str, dict[str, float]] = {}
    for _, table in platform.mappings.tables():
        loader = TableTargets(client, table)
        # a file's first entry in the ledger: written with its changes (batch: in the merge's transaction;
        # streaming: right after the appends); streaming records a file again when it is read again
        first_loaded = f"SELECT source_file, MIN(loaded_at) AS loaded_at FROM {loader.ref(loader.ledger)} GROUP BY source_file"
        sql = (
            f"SELECT UNIX_MICROS(c._commit_ts) AS commit_us, c._source_file AS file, UNIX_MICROS(l.loaded_at) AS "
            f"loaded_us FROM {loader.ref(loader.changelog)} AS c JOIN ({first_loaded}) AS l "
            f"ON l.source_file = c._source_file WHERE c._commit_ts >= TIMESTAMP_MICROS({int(since * 1e6)})"
        )
        for row in client.query(sql).result():
            # MariaDB's binlog has whole seconds: the commit was somewhere in that second, on average its middle
            changes.append((table.target, row.commit_us / 1e6 + 0.5, row.file, row.loaded_us / 1e6))
        sql = (
            f"SELECT batch, MIN(UNIX_MICROS(loaded_at)) AS at FROM {loader.ref(loader.ledger)} "
            f"WHERE loaded_at >= TIMESTAMP_MICROS({int(since * 1e6)}) AND batch != 'stream' GROUP BY batch"
        )
        batches[table.target] = {row.batch: row.at / 1e6 for row in client.query(sql).result()}
    return changes, batches


def file_written_at(key: str) -> float | None:
    """The write time a CDC file's DMS name carries (yyyyMMdd-HHmmss + 4 sub-second digits)."""
    name = key.rsplit("/", 1)[-1].split(".")[0].split("-")
    if len(name) < 2 or not name[0].isdigit():
        return None
    stamp = dt.datetime.strptime(name[0] + name[1][:6], "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
    return stamp.timestamp() + int(name[1][6:10]) / 10_000


def runs_by_file(platform: BenchPlatform) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """For each file, the sensor run that loaded it: created, started, loader step started; and every run's
    materialization timings (stage and merge seconds)."""
    os.environ["DAGSTER_HOME"] = str(platform.state / "dagster" / "home")
    import dagster as dg

    from cdc_assets.load_run import LOADER
    from cdc_assets.writers import STREAM_JOB

    instance = dg.DagsterInstance.get()
    per_file: dict[str, dict[str, float]] = {}
    timings: list[dict[str, Any]] = []
    records = list(
        instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]), limit=100_000)
    )
    # a stream run's loads count whatever its end (the last one is stopped with the platform)
    records += instance.get_run_records(
        dg.RunsFilter(
            job_name=STREAM_JOB, statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.STARTED]
        )
    )
    for record in sorted(records, key=lambda r: r.create_timestamp):
        run = record.dagster_run
        config: dict[str, Any] = dict(run.run_config or {})
        tables = (config.get("ops", {}).get(LOADER, {}).get("config", {}) or {}).get("tables", {})
        if (not tables and run.job_name != STREAM_JOB) or record.start_time is None:
            continue
        step_start = record.start_time
        for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START):
            step_start = event.timestamp
        for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
            metadata = event.asset_materialization.metadata if event.asset_materialization else {}
            values: dict[str, Any] = {name: entry.value for name, entry in metadata.items()}
            entry: dict[str, Any] = {"at": event.timestamp}
            if "stage_s" in values:
                entry.update(stage_s=float(values["stage_s"]), merge_s=float(values["merge_s"]))
            elif "append_s" in values and event.asset_materialization is not None:
                entry.update(
                    table=event.asset_materialization.asset_key.to_user_string(),
                    append_s=float(values["append_s"]),
                    write_api_calls=float(values["write_api_calls"]),
                    write_api_bytes=float(values["write_api_bytes"]),
                    phases=dict(values.get("load_phases_s") or {}),
                )
                if "load_started_at" in values:  # a stream run's load: when ordered, when begun
                    entry.update(
                        target=".".join(event.asset_materialization.asset_key.path[1:]),
                        started=float(values["load_started_at"]),
                        ordered=float(values.get("ordered_at", 0)),
                    )
            else:
                continue
            timings.append(entry)
        info = {
            "created": record.create_timestamp.timestamp(),
            "started": record.start_time,
            "step_started": step_start,
        }
        for files in tables.values():
            for key in files.get("keys", []):
                per_file.setdefault(key, info)
    return per_file, timings


# -- capture against raw decoding of the same binlog --------------------------------------------------------------


def capture_vs_raw(
    platform: BenchPlatform, cluster: str, start: str, end: str, repeats: int
) -> dict[str, Any]:
    """Decode one cluster's binlog range of the 10x phase again, raw and through the capture, alternating."""
    from bench.capture_bench import measure_range

    values = platform.stack_env()
    prefix = f"CDC_MYSQL_{cluster.upper()}_"
    env = {
        **platform.env,
        "CDC_MYSQL_BENCH_HOST": values[prefix + "HOST"],
        "CDC_MYSQL_BENCH_PORT": values[prefix + "PORT"],
        "CDC_MYSQL_BENCH_USER": values[prefix + "USER"],
        "CDC_MYSQL_BENCH_PASSWORD": values[prefix + "PASSWORD"],
        "CDC_BENCH_CLUSTER": cluster,
        "CDC_LANDING_PREFIX": "bench-replay",
    }
    return measure_range(env, start, end, repeats)


def gtid(platform: BenchPlatform, cluster: str) -> str:
    with platform.admin_session(cluster).cursor() as cursor:
        cursor.execute("SELECT @@gtid_binlog_pos")
        return str(cursor.fetchone()[0])


def captured_clusters(platform: BenchPlatform) -> set[str]:
    """The clusters whose capture checkpoint has reached the source's last transaction."""
    clusters = set()
    for status in capture_statuses(platform):
        captured = gtid_numbers(str(status.get("checkpoint", {}).get("gtid", "")))
        source = gtid_numbers(gtid(platform, status["cluster"]))
        if all(captured.get(domain, -1) >= number for domain, number in source.items()):
            clusters.add(status["cluster"])
    return clusters


def caught_up(platform: BenchPlatform, client: Any) -> tuple[set[str], set[str]]:
    """The clusters whose capture checkpoint has reached the source's last transaction, and of their tables those
    with no landed file left unloaded: (clusters, tables by target). The workload has stopped, so a table in both
    holds in BigQuery exactly what its source holds."""
    from cdc_assets.checks import landed_and_unloaded
    from cdc_assets.resources import LandingResource
    from cdc_assets.targets import TableTargets

    clusters = captured_clusters(platform)
    landing = LandingResource.from_settings(Settings.load(platform.stack_env()))
    tables = {
        table.target
        for cluster, table in platform.mappings.tables()
        if cluster.cluster in clusters and not landed_and_unloaded(landing, TableTargets(client, table))[1]
    }
    return clusters, tables


# -- our correctness ----------------------------------------------------------------------------------------------


def our_correctness(platform: BenchPlatform, tables: set[str]) -> dict[str, int]:
    """The caught-up tables' BigQuery current state against their source, value for value (cdc_testing.oracle,
    as the tests judge it); the tables still catching up are counted, not compared (their changes are in flight).
    Duplicated changes are counted in every table: a change in the changelog twice is never in flight."""
    from cdc_assets.targets import TableTargets

    client = bigquery(platform)
    mappings = platform.mappings
    stack = platform.stack
    totals = {"tables": 0, "rows": 0, "missing": 0, "extra": 0, "different": 0, "duplicated_changes": 0}
    totals["tables_still_catching_up"] = sum(1 for _, t in mappings.tables() if t.target not in tables)
    for cluster, table in mappings.tables():
        targets = TableTargets(client, table)
        changes, duplicated = targets.duplicate_changes()
        totals["duplicated_changes"] += duplicated
        if table.target not in tables:
            continue
        source, types = source_table(stack, cluster.cluster, table)
        totals["tables"] += 1
        totals["rows"] += len(source)
        if not table.primary_key:  # append-only: every source row is a change in the table
            totals["missing"] += max(0, len(source) - (changes - duplicated))
            continue
        loaded = oracle.rendered_rows(
            client.query(f"SELECT * FROM {targets.ref(targets.current)}").result(),
            types,
            list(table.primary_key),
        )
        found = oracle.differences(source, loaded)
        totals["missing"] += len(found["missing"])
        totals["extra"] += len(found["extra"])
        totals["different"] += found["different_rows"]
    return totals


def source_table(
    stack: Any, cluster: str, table: Any
) -> tuple[dict[tuple[str, ...], dict[str, Any]], dict[str, str]]:
    """A source table as the oracle renders it (by primary key; append-only tables by their whole row)."""
    user, password = stack.admin_credentials(cluster)
    with stack.mariadb(cluster).connect(user, password) as connection, connection.cursor() as cursor:
        cursor.execute("SET SESSION time_zone = '+00:00'")
        key = list(table.primary_key)
        if key:
            return oracle.source_rows(cursor, table.source_schema, table.source_table, key)
        types = oracle.source_columns(cursor, table.source_schema, table.source_table)
        return oracle.source_rows(cursor, table.source_schema, table.source_table, list(types))


# -- the run ------------------------------------------------------------------------------------------------------


PEER_BIGQUERY = "peer: BigQuery server"
PEER_BIGQUERY_DIR = "peer-bigquery"


def start_peer_bigquery(platform: BenchPlatform, sampler: Sampler) -> Any:
    """The peers' own BigQuery server (same project), counted as a peer, not as the platform."""
    from local_stack.bigquery_emulator import BigQueryEmulatorServer

    server = BigQueryEmulatorServer(
        rest_port=free_port(),
        grpc_port=free_port(),
        project=platform.stack_env()["CDC_BIGQUERY_PROJECT"],
        root=platform.state / PEER_BIGQUERY_DIR,
    )
    server.start()
    platform.peer_bigquery_endpoint = server.endpoint
    pid = server.process.pid()
    if pid is not None:
        sampler.register(pid, PEER_BIGQUERY)
    return server


def start_peer(platform: BenchPlatform, sampler: Sampler, mode: str, duration: float, interval: float) -> Any:
    """The incremental copy: its first (full) copy now, then one every `interval` for `duration` seconds."""
    out = platform.state / f"peer-{mode}.json"
    ready = platform.state / f"peer-{mode}.ready"
    argv = [
        sys.executable, "-m", "bench.peers", mode, "--prefix", f"peer_{mode}", "--out", str(out),
        "--interval", str(interval), "--duration", str(duration), "--ready-file", str(ready),
    ]  # fmt: skip
    process = subprocess.Popen(argv, env=platform.peer_env, cwd=ROOT, start_new_session=True)
    sampler.register(process.pid, f"peer: {mode} copy")
    wait_for(ready.exists, "the incremental copy's initial full copy", timeout=300, interval=1)
    return process, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase-seconds", type=float, default=60.0, help="length of the 1x and 10x phases")
    parser.add_argument("--burst-seconds", type=float, default=15.0)
    parser.add_argument(
        "--burst-multiple", type=float, default=20.0, help="the burst, in multiples of the seed"
    )
    parser.add_argument(
        "--multiples", default="1,10", help="the steady phases, in multiples of the seed's rate"
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        help="the capture's flush interval (s): a file per table per flush (default 5, as the capture's)",
    )
    parser.add_argument(
        "--modes",
        default="streaming,batch",
        help=f"the load modes to measure, in turn, of {', '.join(MODE_ENVIRONMENT)} (streaming-per-batch: "
        "streaming tables in a load run per batch, as before stream runs)",
    )
    parser.add_argument(
        "--peer-interval", type=float, default=120.0, help="the incremental copy's schedule (s)"
    )
    parser.add_argument("--replay-repeats", type=int, default=3, help="pairs of raw decode vs capture")
    parser.add_argument(
        "--drain-seconds",
        type=float,
        help="wait at most this long to catch up (default: what the budget leaves)",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=14.5,
        help="each mode's wall time the catch-up wait fits into",
    )
    parser.add_argument(
        "--source-nice",
        type=int,
        default=0,
        help="the niceness of the source MariaDB servers during the phases (every thread): the sources run on "
        "machines of their own in production, as the workload does (niced 10)",
    )
    parser.add_argument(
        "--hold-capture",
        type=float,
        default=10.0,
        metavar="MULTIPLE",
        help="run that steady phase (default 10; 0: none) with the capture stopped, then let it replay what the "
        "workload wrote: its files land at the capture's replay rate while the workload no longer shares the cores "
        "with the loads, so the stages after a file landed are measured at that rate; its end-to-end latency "
        "includes the hold",
    )
    parser.add_argument("--keep", action="store_true", help="leave the platform running afterwards")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample the BigQuery server and one cluster's capture with py-spy during the 10x phase (20/s)",
    )
    parser.add_argument("--role", choices=["workload"])
    parser.add_argument("--cluster")
    parser.add_argument("--rate", type=float)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.role == "workload":
        workload_role(args)
        return
    report = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    print_beside_published(report, PUBLISHED)
    plot(report, RESULTS / "latency_cdf.png")
    print(f"written: {RESULTS / 'pipeline.json'}, {RESULTS / 'latency_cdf.png'}")


def report_row(label: str, values: list[Any]) -> str:
    """A row of the printed report: the label, then one column per phase ('-' where a phase has no value, e.g. no
    Write API load measured in a phase whose files all loaded in the next one)."""
    return f"{label[:40]:40}" + "".join(f"{'-' if v is None else v:>14}" for v in values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every load mode in turn, each on a fresh platform with the same workload; the peers, the profiles and the
    capture replay once, with the first mode."""
    began = time.monotonic()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODE_ENVIRONMENT))
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {unknown}; choose from {', '.join(MODE_ENVIRONMENT)}")
    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}, Python {sys.version.split()[0]}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": vars(args),
        "modes": {},
    }
    for index, mode in enumerate(modes):
        print(f"load mode: {mode}", flush=True)
        measured = run_mode(args, mode, extras=index == 0)
        for shared in ("peers", "profiles_self_time_share", "capture_vs_raw"):
            if shared in measured:
                report[shared] = measured.pop(shared)
        report["modes"][mode] = measured
    report["wall_seconds"] = round(time.monotonic() - began, 1)
    return report


# what each measured mode sets: the load mode; streaming tables load in a standing stream run (the default, of the
# default CDC_STREAM_RUN_MINUTES), or with "streaming-per-batch" in a load run per batch of files
MODE_ENVIRONMENT = {
    "streaming": {"CDC_LOAD_MODE": "streaming"},
    "batch": {"CDC_LOAD_MODE": "batch"},
    "streaming-per-batch": {"CDC_LOAD_MODE": "streaming", "CDC_STREAM_RUN_MINUTES": "0"},
}


def run_mode(args: argparse.Namespace, mode: str, extras: bool) -> dict[str, Any]:
    began = time.monotonic()
    state = ROOT / ".state" / "bench"
    platform = BenchPlatform(state, extra_env=MODE_ENVIRONMENT[mode])
    if state.exists():  # an earlier run's platform: stopped whole before its folder goes
        subprocess.run([CDC, "stack", "down"], env=platform.env, check=False, capture_output=True)
        stopped = stop_leftovers(state)
        if stopped:
            print(f"stopped {len(stopped)} leftover process(es) of an earlier run", flush=True)
        shutil.rmtree(state)
    os.environ["CDC_STATE_DIR"] = str(state)
    print(f"platform: {state}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the platform below
    platform.cdc("stack", "up", "--free-ports")
    try:
        return measure(args, platform, began, mode, extras)
    finally:
        if not args.keep:
            subprocess.run([CDC, "stack", "down"], env=platform.env, check=False, capture_output=True)
            stop_leftovers(state)


def bench_phases(args: argparse.Namespace) -> list[Phase]:
    """The steady phases (`--multiples`; the one `--hold-capture` names held), then the burst."""
    held = args.hold_capture
    phases = [
        Phase(
            f"{float(m):g}x" + (" held" if float(m) == held else ""),
            float(m),
            args.phase_seconds,
            held=float(m) == held,
        )
        for m in args.multiples.split(",")
    ]
    phases.append(Phase(f"burst {args.burst_multiple:g}x", args.burst_multiple, args.burst_seconds))
    return phases


def measure(
    args: argparse.Namespace, platform: BenchPlatform, began: float, mode: str, extras: bool
) -> dict[str, Any]:
    phases = bench_phases(args)
    sampler = Sampler(platform)
    flush = args.flush_interval or CaptureSettings.flush_interval_s  # both modes: the capture's default
    # the source tables with some rows, captured by the full load
    run_phase(platform, sampler, Phase("seed", 5.0, 10.0), seed=0)
    platform.cdc("capture", "start", "--flush-interval", str(flush))
    platform.cdc("dagster", "start", "--port", str(free_port()))
    client = bigquery(platform)
    drain(platform, client)  # the full loads of the 70 tables are in BigQuery
    incremental = None
    peer_bigquery = None
    if extras:  # last night's copy of the daily batch: what the day's queries see until the next one
        peer_bigquery = start_peer_bigquery(platform, sampler)
        subprocess.run(
            [sys.executable, "-m", "bench.peers", "daily", "--prefix", "peer_daily", "--out",
             str(platform.state / "peer-daily-before.json")], env=platform.peer_env, cwd=ROOT, check=True,
        )  # fmt: skip
        total_seconds = sum(p.seconds for p in phases) + 12 * len(phases)
        incremental = start_peer(platform, sampler, "incremental", total_seconds, args.peer_interval)
    sampler.start()
    if args.source_nice:
        yield_sources(platform, args.source_nice)
    gtids, profiles = run_phases(args, platform, sampler, phases, extras, flush)
    if incremental is not None and incremental[0].wait() != 0:
        raise RuntimeError("the incremental copy failed")
    wait = args.drain_seconds
    if wait is None:  # what the budget leaves after the measurements that follow
        wait = max(
            60.0, args.budget_minutes * 60 - (time.monotonic() - began) - (TAIL_SECONDS if extras else 60)
        )
    try:
        drained_at: float | None = drain(platform, client, timeout=wait)
    except TimeoutError:
        drained_at = None
    cutoff = time.time()
    sampler.stop()
    if drained_at is None:
        print(f"  not caught up {wait:.0f} s after the last phase: what is not loaded is counted")
    else:
        print(f"  drained: every landed file loaded {drained_at - phases[-1].end:.0f} s after the last phase")
    changes, batches = changes_and_files(platform, phases[0].start)
    per_file, timings = runs_by_file(platform)
    report: dict[str, Any] = {
        "load_mode": mode,
        "flush_interval_s": flush,
        "drained_s_after_last_phase": round(drained_at - phases[-1].end, 1) if drained_at else None,
        "phases": [
            phase_report(phase, changes, batches, per_file, timings, sampler, cutoff, drained_at is not None)
            for phase in phases
        ],
        "memory_mb": {
            "peak_per_component": sampler.peak_rss_mb(),
            "peak_platform_total": sampler.peak_total_rss_mb(
                exclude=("workload (6 processes; the game servers)", "peer: incremental copy", PEER_BIGQUERY)
            ),
        },
    }
    if extras and incremental is not None:
        daily_out = platform.state / "peer-daily.json"
        subprocess.run(
            [sys.executable, "-m", "bench.peers", "daily", "--prefix", "peer_daily_after", "--out", str(daily_out)],
            env=platform.peer_env, cwd=ROOT, check=True,
        )  # fmt: skip
        # the peers' tables are compared where they are
        with mock.patch.dict(os.environ, {"CDC_BIGQUERY_ENDPOINT": platform.peer_bigquery_endpoint}):
            report["peers"] = peers_report(phases, incremental[1], daily_out, args.peer_interval)
    if peer_bigquery is not None:
        peer_bigquery.stop()
    if profiles:
        report["profiles_self_time_share"] = {
            name: profile_summary(process, out) for name, process, out in profiles
        }
    report["ours_correctness"] = our_correctness(platform, caught_up(platform, client)[1])
    if extras and gtids.get("start") and gtids.get("end"):
        platform.cdc("dagster", "stop")  # the replay pair runs on a quiet machine, as the raw decode does
        platform.cdc("capture", "stop")
        report["capture_vs_raw"] = capture_vs_raw(
            platform, REPLAY_CLUSTER, gtids["start"], gtids["end"], args.replay_repeats
        )
    return report


REPLAY_CLUSTER = "slots_play"


def run_phases(
    args: argparse.Namespace,
    platform: BenchPlatform,
    sampler: Sampler,
    phases: list[Phase],
    extras: bool,
    flush: float | None = None,
) -> tuple[dict[str, str], list[tuple[str, Any, Path]]]:
    """The phases one after the other; around the 10x phase, the replay cluster's binlog range (and profiles)."""
    gtids: dict[str, str] = {}
    profiles: list[tuple[str, Any, Path]] = []
    for index, phase in enumerate(phases, 1):
        if phase.multiple == 10 and extras:
            gtids["start"] = gtid(platform, REPLAY_CLUSTER)
            if args.profile:
                profiles = start_profiles(platform, REPLAY_CLUSTER, phase.seconds + 8)
        run_phase(platform, sampler, phase, seed=index, flush=flush)
        if phase.multiple == 10 and extras:
            gtids["end"] = gtid(platform, REPLAY_CLUSTER)
    return gtids, profiles


def start_profiles(platform: BenchPlatform, cluster: str, seconds: float) -> list[tuple[str, Any, Path]]:
    """py-spy (20 samples/s, without pausing the process) on the BigQuery server and on `cluster`'s capture."""
    from bench.bench_platform import _processes

    RESULTS.mkdir(
        parents=True, exist_ok=True
    )  # py-spy writes there (a fresh clone has no results folder yet)
    targets = {"BigQuery server": platform.service_pids()["bigquery"]}
    for pid, process in _processes().items():
        if "capture run" in process.command and f"--cluster {cluster}" in process.command:
            targets[f"capture ({cluster})"] = pid
    started = []
    for name, pid in targets.items():
        out = RESULTS / f"profile-{name.split()[0].lower()}.txt"
        argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "20",
                "--duration", str(int(seconds)), "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
        started.append(
            (name, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
        )
    return started


def profile_summary(process: Any, out: Path, top: int = 6) -> dict[str, float]:
    """Share of the samples whose innermost frame is in each module (self time), the largest first."""
    process.wait(timeout=120)
    if not out.exists():  # the measurements stand without it
        return {f"(no profile: py-spy exited {process.returncode})": 0.0}
    counts: dict[str, int] = defaultdict(int)
    for line in out.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        counts[leaf[leaf.rfind("(") + 1 : leaf.rfind(":")]] += int(number)  # py-spy's short module path
    total = sum(counts.values()) or 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return {where: round(100 * n / total, 1) for where, n in ranked}


TAIL_SECONDS = 240  # after the catch-up: the daily copy, the comparison, the capture replay


def free_port() -> int:
    from local_stack.processes import free_port as pick

    return pick()


def drain(platform: BenchPlatform, client: Any, timeout: float = 300) -> float:
    """Wait until every cluster's capture has reached its source's last transaction and every landed file is in
    its table's ledger."""
    count = len(list(platform.mappings.tables()))

    def drained() -> bool:
        # the clusters first (cheap); the tables' ledgers (a BigQuery query each) only once they have caught up
        if len(captured_clusters(platform)) < len(platform.mappings.clusters):
            return False
        return len(caught_up(platform, client)[1]) == count

    wait_for(drained, "every landed file to be loaded", timeout=timeout, interval=5)
    return time.time()


def phase_report(
    phase: Phase,
    changes: list[tuple[str, float, str, float]],
    batches: dict[str, dict[str, float]],
    per_file: dict[str, dict[str, float]],
    timings: list[dict[str, Any]],
    sampler: Sampler,
    cutoff: float,
    drained: bool,
) -> dict[str, Any]:
    caps = Settings.load()
    mine = [c for c in changes if phase.start <= c[1] < phase.end + 1]
    latency = [visible - commit for _, commit, _, visible in mine]
    # changes written but not visible when the run ended: their latency is at least cutoff - commit (censored;
    # counted with the phase's middle as their commit time)
    # once drained (every source transaction captured, every file loaded) nothing is in flight: the workload's own
    # count differs from the binlog's by commits that fell just outside the phase's window (counted in JSON)
    unmatched = phase.changes - len(mine)
    not_loaded = 0 if drained else max(0, unmatched)
    censored = latency + [cutoff - (phase.start + phase.end) / 2] * not_loaded
    per_table: dict[str, list[float]] = defaultdict(list)
    stages: dict[str, list[float]] = defaultdict(list)
    stream_loads: dict[str, list[tuple[float, float, float]]] = defaultdict(
        list
    )  # table -> (at, started, ordered)
    for t in timings:
        if "started" in t:
            stream_loads[t["target"]].append((t["at"], t["started"], t["ordered"]))
    for table_loads in stream_loads.values():
        table_loads.sort()
    for table, commit, key, visible in mine:
        per_table[table].append(visible - commit)
        written = file_written_at(key)
        if written is None:
            continue
        stages["capture (commit -> file in S3)"].append(written - commit)
        stages["after the file landed (pickup + queue + start + load)"].append(visible - written)
        run = per_file.get(key)  # the load run that named the file (none: a stream run loaded it)
        if run is None:
            of_table = stream_loads.get(table, [])
            index = bisect.bisect_left(of_table, (visible,))
            if index < len(of_table) and written <= of_table[index][1] <= visible:
                _, started, ordered = of_table[index]
                stages["until the table's load began (pickup + order + wait)"].append(started - written)
                if written <= ordered <= started:  # the file was in the first order of the load's files
                    stages["  of which the sensor's pickup (-> order)"].append(ordered - written)
                stages["load (-> visible in BigQuery)"].append(visible - started)
            continue
        if not written <= run["created"] <= run["started"] <= run["step_started"] <= visible:
            continue  # or loaded ahead of its message, by an earlier run that listed it (streaming)
        stages["pickup (file -> sensor's run request)"].append(run["created"] - written)
        stages["queue (-> run started)"].append(run["started"] - run["created"])
        stages["worker start (-> loader step)"].append(run["step_started"] - run["started"])
        stages["load (-> visible in BigQuery)"].append(visible - run["step_started"])
    seconds = phase.end - phase.start
    tail = (phase.caught_up_s or 0.0) + 30  # the loads of what the phase wrote (held: after its replay)
    window = [t for t in timings if phase.start <= t["at"] < phase.end + tail]
    streamed = [t for t in window if "append_s" in t]
    loads = {
        t: sum(1 for at in b.values() if phase.start <= at < phase.end + tail) for t, b in batches.items()
    }
    projected = {t: round(n / seconds * 86_400) for t, n in loads.items()}
    busiest = max(projected.values(), default=0)
    return {
        "phase": phase.name,
        "seconds": seconds,
        "asked_rows_per_s": round(phase.rate),
        "workload_rows_per_s": round(phase.changes / seconds),
        # held: the capture ran only while it replayed the phase
        "capture_rows_per_s": round(phase.capture_rows / (phase.caught_up_s or seconds)),
        "capture_held": phase.held,
        "capture_caught_up_s_after_phase": phase.caught_up_s,
        "loaded_rows_per_s": round(len(mine) / seconds),
        "changes_visible_by_the_end": len(mine),
        "changes_not_loaded_by_the_end": not_loaded,
        "workload_count_minus_changes_in_window": unmatched,
        "latency_s": summary(censored),
        "latency_is_lower_bound": not_loaded > 0,
        "latency_s_per_table": {t: summary(v) for t, v in sorted(per_table.items())},
        "stages_p50_s": {k: round(statistics.median(v), 2) for k, v in stages.items()},
        "stage_job_p50_s": _median([t["stage_s"] for t in window if "stage_s" in t]),
        "merge_job_p50_s": _median([t["merge_s"] for t in window if "merge_s" in t]),
        "write_api_append_p50_s": _median([t["append_s"] for t in streamed]),
        "load_phases_p50_s": {
            name: _median([t["phases"].get(name, 0.0) for t in streamed if t.get("phases")])
            for name in LOAD_PHASES
        }
        if any(t.get("phases") for t in streamed)
        else None,
        "write_api": _write_api_projection(streamed, seconds),
        "cpu_seconds": sampler.cpu_seconds(phase.start, phase.end),
        "load_jobs": {
            "in_phase_total": sum(loads.values()),
            "projected_per_table_per_day_max": busiest,
            "projected_per_table_per_day_median": statistics.median(projected.values()) if projected else 0,
            "projected_project_per_day": sum(projected.values()),
            "tables_over_1500_unthrottled": sum(1 for v in projected.values() if v > TABLE_LIMIT),
            # the sensor's token buckets (cdc_assets/quota.py) admit at most the caps in any 24 hours: this run's
            # cadence held for a day, once the burst is spent, is cut to them
            "production_caps_per_table_per_day_max": min(busiest, caps.max_load_jobs_per_table_per_day),
            "production_caps_project_per_day": min(
                sum(min(v, caps.max_load_jobs_per_table_per_day) for v in projected.values()),
                caps.max_load_jobs_per_project_per_day,
            ),
        },
        "latency_values": [round(v, 3) for v in latency],
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _write_api_projection(streamed: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Storage Write API calls and bytes of the phase, per table and in all, held for a day: against BigQuery's
    throughput (3 GB/s multi-region) and its 10,000 CreateWriteStream an hour (none per batch here)."""
    calls: dict[str, float] = defaultdict(float)
    size: dict[str, float] = defaultdict(float)
    for t in streamed:
        calls[t["table"]] += t["write_api_calls"]
        size[t["table"]] += t["write_api_bytes"]
    day = 86_400 / max(seconds, 1)
    return {
        "loads_in_phase": len(streamed),
        "calls_per_table_per_day_max": round(max(calls.values(), default=0) * day),
        "calls_per_project_per_day": round(sum(calls.values()) * day),
        "bytes_per_project_per_day": round(sum(size.values()) * day),
        "mb_per_s_average": round(sum(size.values()) / max(seconds, 1) / 1e6, 3),
    }


def peers_report(
    phases: list[Phase], incremental_out: Path, daily_out: Path, schedule: float
) -> dict[str, Any]:
    from bench.peers import compare_with_source, latencies

    incremental = json.loads(incremental_out.read_text())
    daily = json.loads(daily_out.read_text())
    daily_run = daily["runs"][0]
    start, end = phases[0].start, phases[-1].end
    increments = latencies("peer_incremental", start)
    runs = incremental["runs"]
    gaps = [b["started"] - a["started"] for a, b in itertools.pairwise(runs)]
    interval = round(statistics.median(gaps), 1) if gaps else schedule
    day = 86_400.0
    duration = daily_run["ended"] - daily_run["started"]
    return {
        "daily_batch": {
            "latency_s": {
                "p50": round(day / 2 + duration),
                "p95": round(0.95 * day + duration),
                "max": round(day + duration),
            },
            "latency_note": "a change waits for the next nightly copy: uniform over the day, plus the copy's duration",
            "copy_seconds": round(duration, 1),
            "load_jobs_per_day": daily["load_jobs"],
            "bytes_per_day": daily["bytes_loaded"],
            "rows_per_copy": daily["rows_copied"],
            "correctness_before_the_next_copy": compare_with_source("peer_daily")["total"],
            "correctness_right_after_a_copy": compare_with_source("peer_daily_after")["total"],
        },
        "incremental_copy": {
            "interval_s": interval,
            "latency_s_of_rows_it_holds": summary(increments),
            "latency_values": [round(v, 3) for v in increments],
            "runs": len(incremental["runs"]),
            "load_jobs": incremental["load_jobs"],
            "query_jobs": incremental["query_jobs"],
            "bytes_loaded": incremental["bytes_loaded"],
            "load_jobs_per_day_projected": round(incremental["load_jobs"] / max(end - start, 1) * day),
            "cursor_columns": incremental["cursor_columns"],
            "correctness": compare_with_source("peer_incremental")["total"],
        },
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"\npipeline benchmark ({report['machine']}, {report['date']}, {report['wall_seconds']} s)")
    for mode, measured in report["modes"].items():
        print_mode(mode, measured)
    print_side_by_side(report["modes"])
    if "peers" in report:
        print_peers(report["peers"])
    for name, shares in report.get("profiles_self_time_share", {}).items():
        print(
            f"profile of the {name} in the 10x phase (self time): "
            + ", ".join(f"{k} {v}%" for k, v in shares.items())
        )
    if "capture_vs_raw" in report:
        replay = report["capture_vs_raw"]
        print(
            f"capture vs raw binlog decode of the 10x phase's binlog ({REPLAY_CLUSTER}, {replay['rows']:,} row changes): "
            f"raw {replay['raw_decode_rows_per_s_median']:,.0f}/s, capture {replay['capture_rows_per_s_median']:,.0f}/s, "
            f"ratio {replay['capture_vs_raw_ratio_median']:.2f} (pairs: {', '.join(f'{p:.2f}' for p in replay['ratios'])}); "
            f"raw with the capture's decoders {replay['raw_decode_same_decoders_rows_per_s_median']:,.0f}/s, "
            f"ratio {replay['capture_vs_same_decoders_ratio_median']:.2f}"
        )


def print_mode(mode: str, measured: dict[str, Any]) -> None:
    phases = measured["phases"]
    print(f"\n{mode} mode (capture flush every {measured['flush_interval_s']:g} s)")
    print(f"{'':40}" + "".join(f"{p['phase']:>14}" for p in phases))

    def row(label: str, values: list[Any]) -> None:
        print(report_row(label, values))

    row("rows/s asked", [f"{p['asked_rows_per_s']:,}" for p in phases])
    row("rows/s written (workload)", [f"{p['workload_rows_per_s']:,}" for p in phases])
    row("rows/s captured", [f"{p['capture_rows_per_s']:,}" for p in phases])
    row("rows/s visible in BigQuery", [f"{p['loaded_rows_per_s']:,}" for p in phases])
    row("changes visible by the end", [f"{p['changes_visible_by_the_end']:,}" for p in phases])
    row("changes not loaded by the end", [f"{p['changes_not_loaded_by_the_end']:,}" for p in phases])
    for key in ("p50", "p95", "max"):
        row(
            f"latency {key} (s)",
            [
                (">=" if p["latency_is_lower_bound"] else "") + str(p["latency_s"].get(key, "-"))
                for p in phases
            ],
        )
    stages = list(dict.fromkeys(stage for p in phases for stage in p["stages_p50_s"]))
    for stage in stages:
        row(f"  {stage}", [p["stages_p50_s"].get(stage, "-") for p in phases])
    if mode == "streaming":
        row("  Write API load (3 appends) p50 (s)", [p["write_api_append_p50_s"] for p in phases])
        for name in LOAD_PHASES:
            row(
                f"    load phase {name} p50 (s)",
                [(p["load_phases_p50_s"] or {}).get(name, "-") for p in phases],
            )
        row(
            "Write API calls/table/day (max)",
            [f"{p['write_api']['calls_per_table_per_day_max']:,}" for p in phases],
        )
        row(
            "Write API calls/project/day",
            [f"{p['write_api']['calls_per_project_per_day']:,}" for p in phases],
        )
        row("Write API MB/s (average)", [p["write_api"]["mb_per_s_average"] for p in phases])
    else:
        row("  staging load job p50 (s)", [p["stage_job_p50_s"] for p in phases])
        row("  merge transaction p50 (s)", [p["merge_job_p50_s"] for p in phases])
        for label, key in (
            ("load jobs/table/day (max, this pace)", "projected_per_table_per_day_max"),
            ("load jobs/project/day (this pace)", "projected_project_per_day"),
            ("  under the caps: per table (max)", "production_caps_per_table_per_day_max"),
            ("  under the caps: project", "production_caps_project_per_day"),
        ):
            row(label, [f"{p['load_jobs'][key]:,}" for p in phases])
    components = sorted({c for p in phases for c in p["cpu_seconds"]})
    for component in components:
        row(
            f"CPU % {component}",
            [f"{100 * p['cpu_seconds'].get(component, 0) / p['seconds']:.0f}" for p in phases],
        )
    memory = measured["memory_mb"]
    print(
        "peak memory, PSS (MB): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in memory["peak_per_component"].items())
    )
    print(
        f"peak memory (PSS) of the platform (all but workload and peers): {memory['peak_platform_total']:,.0f} MB"
    )
    ours = measured["ours_correctness"]
    print(
        f"correctness: {ours['rows']:,} rows in the {ours['tables']} caught-up tables compared value for value: "
        f"{ours['missing']} missing, {ours['extra']} extra, {ours['different']} different; "
        f"{ours['duplicated_changes']} duplicated changes in all tables; "
        f"{ours['tables_still_catching_up']} tables still catching up (not compared)"
    )


def print_side_by_side(modes: dict[str, dict[str, Any]]) -> None:
    if len(modes) < 2:
        return
    print("\nside by side, latency p50 / p95 (s), and p50 of the stages after the file landed")
    names = [p["phase"] for p in next(iter(modes.values()))["phases"]]
    print(f"{'':16}" + "".join(f"{n:>26}" for n in names))
    after = "after the file landed (pickup + queue + start + load)"
    for mode, measured in modes.items():
        cells = []
        for p in measured["phases"]:
            bound = ">=" if p["latency_is_lower_bound"] else ""
            cells.append(
                f"{bound}{p['latency_s'].get('p50', '-')} / {p['latency_s'].get('p95', '-')} ({p['stages_p50_s'].get(after, '-')})"
            )
        print(f"{mode:16}" + "".join(f"{c:>26}" for c in cells))


def key_figures(report: dict[str, Any]) -> dict[str, float | None]:
    """The figures the targets are set on (docs/benchmarks.md), by name: latency and capture rows/s per mode and
    phase, peak PSS of the platform, of our own processes and of the capture, and capture vs raw decoding."""
    figures: dict[str, float | None] = {}
    for mode, measured in report.get("modes", {}).items():
        for phase in measured.get("phases", []):
            name = f"{mode} {phase['phase']}"
            figures[f"{name}: latency p50 (s)"] = phase["latency_s"].get("p50")
            figures[f"{name}: latency p95 (s)"] = phase["latency_s"].get("p95")
            stages = phase.get("stages_p50_s") or {}
            figures[f"{name}: after the file landed p50 (s)"] = next(
                (v for k, v in stages.items() if k.startswith("after the file landed")), None
            )
            figures[f"{name}: rows/s captured"] = phase.get("capture_rows_per_s")
        memory = measured.get("memory_mb", {})
        peaks = memory.get("peak_per_component", {})
        figures[f"{mode}: peak PSS of the platform (MB)"] = memory.get("peak_platform_total")
        figures[f"{mode}: peak PSS of our own processes (MB)"] = (
            round(sum(peaks.get(c, 0.0) for c in OWN_COMPONENTS), 1) if peaks else None
        )
        figures[f"{mode}: peak PSS of the capture (MB)"] = peaks.get(OWN_COMPONENTS[0])
    replay = report.get("capture_vs_raw") or {}
    figures["capture / raw decode, pipeline run (median)"] = replay.get("capture_vs_raw_ratio_median")
    return figures


def print_beside_published(report: dict[str, Any], published_path: Path) -> None:
    """Each key figure beside the published run's (the one docs/benchmarks.md reports), where it has it."""
    try:
        published = json.loads(published_path.read_text())
    except (OSError, ValueError):
        print(f"\nno published run to compare with ({published_path})")
        return
    now, before = key_figures(report), key_figures(published)
    print(
        f"\nbeside the published run ({published_path.name} of docs/benchmarks.md, {published.get('date')})"
    )
    print(f"{'':52}{'this run':>14}{'published':>14}")
    for name, value in now.items():
        shown = [_figure(v) for v in (value, before.get(name))]
        print(f"{name[:52]:52}{shown[0]:>14}{shown[1]:>14}")


def _figure(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def print_peers(peers: dict[str, Any]) -> None:
    daily, incremental = peers["daily_batch"], peers["incremental_copy"]
    stale = daily["correctness_before_the_next_copy"]
    print(
        f"\ndaily batch: latency p50 {daily['latency_s']['p50']:,} s (schedule); copy {daily['copy_seconds']} s, "
        f"{daily['load_jobs_per_day']} load jobs/day, {daily['bytes_per_day']:,} bytes/day; before its next copy it "
        f"lacks {stale['missing']:,} rows, holds {stale['missed_deletes']:,} deleted and {stale['missed_updates']:,} stale"
    )
    inc = incremental["correctness"]
    lat = incremental["latency_s_of_rows_it_holds"]
    print(
        f"incremental copy every {incremental['interval_s']} s: latency of rows it holds p50 {lat.get('p50')} s, "
        f"p95 {lat.get('p95')} s; {incremental['load_jobs']} load + {incremental['query_jobs']} query jobs "
        f"({incremental['load_jobs_per_day_projected']:,} load jobs/day projected); at the end it lacks "
        f"{inc['missing']:,} rows, holds {inc['missed_deletes']:,} deleted and {inc['missed_updates']:,} stale"
    )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    series = [
        (f"ours ({mode}), {p['phase']}", p["latency_values"])
        for mode, measured in report["modes"].items()
        for p in measured["phases"]
    ]
    if "peers" in report:
        series.append(
            ("incremental copy (rows it holds)", report["peers"]["incremental_copy"]["latency_values"])
        )
    for label, values in series:
        if not values:
            continue
        ordered = sorted(values)
        axis.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    if "peers" in report:
        daily = report["peers"]["daily_batch"]["copy_seconds"]
        day = [daily + s for s in range(0, 86_400, 60)]
        axis.plot(
            day, [(i + 1) / len(day) for i in range(len(day))], label="daily batch (schedule)", linestyle="--"
        )
    axis.set_xscale("log")
    axis.set_xlabel("seconds from commit in MariaDB to visible in BigQuery (log scale)")
    axis.set_ylabel("share of changes")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right")
    axis.set_title(f"Latency CDF - {report['machine']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
