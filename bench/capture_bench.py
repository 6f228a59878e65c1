"""Capture throughput against raw binlog decoding of the same binlog, measured side by side in one run.

Generates a binlog of N changes (inserts, updates, deletes on a table shaped like `bets`) in a private MariaDB,
then alternates, R times: (A) raw decode - the stock mysql-replication reading the same binlog range and touching
every value, nothing else; (A') the same with the capture's decoders (capture/binlog_fixes.py, table_map_cache.py);
(B) the capture - decoding, normalising, Parquet, S3 PUTs and checkpoints - over the same range. Each run is a
separate process so its peak RSS is its own. Prints medians, the ratios B/A and B/A' per pair, writes JSON.

    python -m bench.capture_bench [--rows 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TABLE_DDL = """CREATE TABLE IF NOT EXISTS bench.bets (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, round_id BIGINT UNSIGNED NOT NULL,
  player_id BIGINT UNSIGNED NOT NULL, stake DECIMAL(18,4) NOT NULL, payout DECIMAL(18,4) NOT NULL,
  currency ENUM('EUR','USD','KRW') NOT NULL, status ENUM('open','won','lost') NOT NULL,
  is_bonus TINYINT(1) NOT NULL, flags BIT(1) NOT NULL, placed_at DATETIME(6) NOT NULL,
  note VARCHAR(64) CHARACTER SET utf8mb4 NULL, updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"""


def _mapping_dir(work: Path) -> Path:
    folder = work / "mappings"
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "cluster": "bench",
        "connection": {
            "host_env": "CDC_MYSQL_BENCH_HOST",
            "port_env": "CDC_MYSQL_BENCH_PORT",
            "user_env": "CDC_MYSQL_BENCH_USER",
            "password_env": "CDC_MYSQL_BENCH_PASSWORD",
            "tls_env": "CDC_MYSQL_BENCH_TLS",
        },
        "tables": [{"source": "bench.bets", "target": "bench.bets", "primary_key": ["id"]}],
    }
    (folder / "bench.json").write_text(json.dumps(document))
    return folder


def _generate(stack: Any, rows: int) -> tuple[str, str, int]:
    """Write `rows` changes; return the GTID before and after, and the number of row changes in the binlog."""
    user, password = stack.admin_credentials("bench")
    connection = stack.mariadb("bench").connect(user, password)
    connection.autocommit(True)
    with connection.cursor() as cursor:
        cursor.execute("CREATE DATABASE IF NOT EXISTS bench")
        cursor.execute(TABLE_DDL)
        cursor.execute("SELECT @@gtid_binlog_pos")
        start = cursor.fetchone()[0]
        inserts = int(rows * 0.7)
        batch = 1000  # 1,000-row transactions, as a busy game backend commits
        for first in range(0, inserts, batch):
            cursor.execute(
                "INSERT INTO bench.bets (round_id, player_id, stake, payout, currency, status, is_bonus, flags, "
                "placed_at, note) SELECT seq, seq % 5000, seq / 7, seq / 11, ELT(1 + seq % 3, 'EUR', 'USD', 'KRW'), "
                "'open', seq % 2, seq % 2, NOW(6), CONCAT('bet ', seq, ' 🎰') "
                f"FROM bench.seq_{first + 1}_to_{min(first + batch, inserts)}"
            )
        updates = int(rows * 0.25)
        for first in range(0, updates, batch):
            cursor.execute(
                "UPDATE bench.bets SET status = 'won', payout = payout * 2 "
                f"WHERE id BETWEEN {first + 1} AND {min(first + batch, updates)}"
            )
        deletes = rows - inserts - updates
        cursor.execute(f"DELETE FROM bench.bets ORDER BY id DESC LIMIT {deletes}")
        cursor.execute("SELECT @@gtid_binlog_pos")
        end = cursor.fetchone()[0]
    connection.close()
    return start, end, inserts + updates + deletes


def measure_range(env: dict[str, str], start: str, end: str, repeats: int) -> dict[str, Any]:
    """Raw decode and the capture over the binlog range (start, end] of the cluster CDC_BENCH_CLUSTER names in
    `env` (default `bench`), alternating `repeats` times; each run in its own process."""
    pairs: list[dict[str, Any]] = []
    rows = 0
    for _ in range(repeats):
        raw = _measure("raw", env, start, end)
        rows = int(raw["rows"])
        fast = _measure("raw-fast", env, start, end)
        cap = _measure("capture", env, start, end, rows)
        pairs.append(
            {
                "raw": raw,
                "raw_fast": fast,
                "capture": cap,
                "ratio": cap["rows_per_s"] / raw["rows_per_s"],
                "ratio_same_decoders": cap["rows_per_s"] / fast["rows_per_s"],
            }
        )
    return {
        "rows": rows,
        "repeats": repeats,
        "raw_decode_rows_per_s_median": statistics.median(p["raw"]["rows_per_s"] for p in pairs),
        "capture_rows_per_s_median": statistics.median(p["capture"]["rows_per_s"] for p in pairs),
        "capture_vs_raw_ratio_median": statistics.median(p["ratio"] for p in pairs),
        "ratios": [round(p["ratio"], 3) for p in pairs],
        "raw_decode_same_decoders_rows_per_s_median": statistics.median(
            p["raw_fast"]["rows_per_s"] for p in pairs
        ),
        "capture_vs_same_decoders_ratio_median": statistics.median(p["ratio_same_decoders"] for p in pairs),
        "ratios_same_decoders": [round(p["ratio_same_decoders"], 3) for p in pairs],
        "raw_peak_rss_mb_median": statistics.median(p["raw"]["peak_rss_mb"] for p in pairs),
        "capture_peak_rss_mb_median": statistics.median(p["capture"]["peak_rss_mb"] for p in pairs),
        "pairs": pairs,
    }


def _cluster() -> Any:
    from cdc.mappings import load_mappings

    return load_mappings().cluster(os.environ.get("CDC_BENCH_CLUSTER", "bench"))


def _measure(role: str, env: dict[str, str], start: str, end: str, rows: int = 0) -> dict[str, float]:
    """Run one measurement in its own process; wall time from its own report, peak RSS from the kernel. The raw
    decode counts the row changes in the range; the capture is given that count."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.capture_bench",
            "--role",
            role,
            "--start",
            start,
            "--end",
            end,
            "--out",
            str(out),
        ],
        env=env,
        cwd=ROOT,
    )
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{role} run failed with status {status}")
    report = json.loads(out.read_text())
    out.unlink()
    rows = int(report.get("rows", rows))
    return {
        "seconds": report["seconds"],
        "rows": rows,
        "rows_per_s": rows / report["seconds"],
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def gtid_numbers(state: str) -> dict[str, int]:
    """'0-1-10,1-2-5' -> {'0': 10, '1': 5}: each replication domain's sequence number."""
    numbers = {}
    for gtid in filter(None, (g.strip() for g in state.split(","))):
        domain, _, sequence = gtid.split("-")
        numbers[domain] = int(sequence)
    return numbers


def _raw_decode_fast(start: str, end: str) -> tuple[float, int]:
    """The raw decode with the capture's own decoders in place."""
    from capture import binlog_fixes, table_map_cache  # noqa: F401

    return _raw_decode(start, end)


def _raw_decode(start: str, end: str) -> tuple[float, int]:
    """Decode the range and touch every value; stop at the commit of the range's last transaction. Returns the
    seconds and the row changes decoded."""
    from pymysqlreplication import BinLogStreamReader
    from pymysqlreplication.event import MariadbGtidEvent, XidEvent
    from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

    from cdc.settings import Settings
    from cdc.source import cluster_connection

    cluster = _cluster()
    last = set(end.split(","))
    began = time.perf_counter()
    stream = BinLogStreamReader(
        connection_settings=cluster_connection(cluster, Settings.load()).settings(),
        server_id=424242,
        blocking=True,
        auto_position=start,
        is_mariadb=True,
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, MariadbGtidEvent, XidEvent],
        only_schemas=sorted({t.source_schema for t in cluster.enabled_tables}),
        enable_logging=False,
    )
    touched = 0
    changes = 0
    gtid = ""
    for event in stream:
        if isinstance(event, MariadbGtidEvent):
            gtid = event.gtid
        elif isinstance(event, XidEvent):
            if gtid in last:
                break
        else:
            changes += len(event.rows)
            for row in event.rows:
                for image in row.values():
                    touched += len(image)
    stream.close()
    return time.perf_counter() - began, changes


def _capture(start: str, end: str) -> tuple[float, int]:
    import threading

    from capture.runner import s3_store
    from capture.service import CaptureSettings, ClusterCapture
    from cdc.settings import Settings
    from cdc.source import cluster_connection

    cluster = _cluster()
    config = Settings.load()
    store = s3_store(config)
    snapshotted = {t.source: {"snapshot_position": "bench"} for t in cluster.enabled_tables}
    store.write_json("checkpoints", cluster.cluster, {"gtid": start, "tables": snapshotted})
    capture = ClusterCapture(
        cluster, cluster_connection(cluster, config), store, CaptureSettings(flush_interval_s=0.5)
    )
    wanted = gtid_numbers(end)

    def watch() -> None:
        # The in-memory checkpoint is updated only after it was written to S3; polling S3 would load moto. The
        # binlog may go on past the range: stop once every domain's checkpoint has reached the range's end.
        while not capture.stop_requested.is_set():
            reached = gtid_numbers(str(capture.checkpoint.get("gtid", "")))
            if all(reached.get(domain, -1) >= number for domain, number in wanted.items()):
                capture.stop()
                return
            time.sleep(0.05)

    began = time.perf_counter()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    capture.run()
    return time.perf_counter() - began, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--role", choices=["raw", "raw-fast", "capture"])
    parser.add_argument("--start")
    parser.add_argument("--end")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.role:
        run = {"raw": _raw_decode, "raw-fast": _raw_decode_fast, "capture": _capture}[args.role]
        if os.environ.get("CDC_BENCH_PROFILE"):  # where the time goes: a cProfile dump per role
            import cProfile

            profiler = cProfile.Profile()
            seconds, rows = profiler.runcall(run, args.start, args.end)
            profiler.dump_stats(str(RESULTS / f"profile-{args.role}.prof"))
        else:
            seconds, rows = run(args.start, args.end)
        Path(args.out).write_text(json.dumps({"seconds": seconds, **({"rows": rows} if rows else {})}))
        return

    from cdc.mappings import load_mappings
    from local_stack.stack import LocalStack

    with tempfile.TemporaryDirectory(prefix="cdc-bench-") as tmp:
        work = Path(tmp)
        stack = LocalStack(load_mappings(_mapping_dir(work)), state_dir=work / "state")
        stack.configure(free_ports=True)
        stack.up()
        try:
            start, end, rows = _generate(stack, args.rows)
            env = {
                **os.environ,
                **stack.environment(),
                "CDC_LANDING_PREFIX": "bench",
                "CDC_MAPPINGS_DIR": str(work / "mappings"),
            }
            measured = measure_range(env, start, end, args.repeats)
        finally:
            stack.down()
    result = {
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}, Python {sys.version.split()[0]}",
        **measured,
    }
    pairs = measured["pairs"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "capture.json").write_text(json.dumps(result, indent=2))
    print(f"\ncapture benchmark: {rows} row changes, {args.repeats} alternating pairs ({result['machine']})")
    print(f"{'':28}{'raw (stock)':>14}{'raw (ours)':>14}{'capture':>14}{'vs stock':>10}{'vs ours':>10}")
    print(
        f"{'rows/s (median)':28}{result['raw_decode_rows_per_s_median']:>14,.0f}"
        f"{result['raw_decode_same_decoders_rows_per_s_median']:>14,.0f}"
        f"{result['capture_rows_per_s_median']:>14,.0f}{result['capture_vs_raw_ratio_median']:>10.2f}"
        f"{result['capture_vs_same_decoders_ratio_median']:>10.2f}"
    )
    print(
        f"{'peak RSS MB (median)':28}{result['raw_peak_rss_mb_median']:>14.0f}"
        f"{statistics.median(p['raw_fast']['peak_rss_mb'] for p in pairs):>14.0f}"
        f"{result['capture_peak_rss_mb_median']:>14.0f}"
    )
    for index, pair in enumerate(pairs, 1):
        print(
            f"  pair {index}: raw {pair['raw']['rows_per_s']:,.0f}/s, raw (ours) {pair['raw_fast']['rows_per_s']:,.0f}/s, "
            f"capture {pair['capture']['rows_per_s']:,.0f}/s, ratios {pair['ratio']:.2f} / {pair['ratio_same_decoders']:.2f}"
        )
    print(f"written: {RESULTS / 'capture.json'}")


if __name__ == "__main__":
    main()
