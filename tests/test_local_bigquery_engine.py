"""The local BigQuery server's one DuckDB connection, as `local_stack/bigquery_cdc.py` shares it between threads: each
statement's result belongs to the thread that ran it, with the rows and Arrow types DuckDB itself gives.

Run in a child process: `bigquery_cdc.apply()` patches bqemulator's classes for the whole process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, threading
    import duckdb
    from bqemulator.config import Settings
    from bqemulator.storage.engine import DuckDBEngine
    from local_stack import bigquery_cdc

    bigquery_cdc.apply()
    engine = DuckDBEngine(Settings())
    engine._connection = duckdb.connect()
    engine.execute("CREATE TABLE counted (id BIGINT)")
    wrong = []

    def query(value):
        for _ in range(1500):
            row = engine.execute(f"SELECT {value} AS v FROM range(20) LIMIT 1").fetchone()
            if row != (value,):
                wrong.append(f"SELECT {value} fetched {row!r}")

    def insert():
        for n in range(1500):
            row = engine.execute("INSERT INTO counted VALUES (?), (?)", [n, n]).fetchone()
            if row != (2,):
                wrong.append(f"INSERT of 2 rows fetched {row!r}")

    threads = [threading.Thread(target=query, args=(v,)) for v in (1, 2)] + [threading.Thread(target=insert)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    typed = (
        "SELECT '0b5c2a3e-8a5f-4a9e-9d3c-1f2e3d4c5b6a'::UUID AS u, 170141183460469231731687303715884105727::HUGEINT AS h,"
        " '{\\"a\\": 1}'::JSON AS j, 12.50::DECIMAL(10, 2) AS d, TIMESTAMPTZ '2026-11-30 12:00:00+00' AS t, [1, 2] AS l"
    )
    raw = duckdb.connect()
    raw.execute("SET TimeZone = 'UTC'")
    engine.execute("SET TimeZone = 'UTC'")
    print(json.dumps({
        "wrong": wrong[:5],
        "wrong_count": len(wrong),
        "counted": engine.execute("SELECT COUNT(*) FROM counted").fetchone()[0],
        "rows_equal": engine.execute(typed).fetchall() == raw.execute(typed).fetchall(),
        "row_types": [type(v).__name__ for v in engine.execute(typed).fetchone()],
        "arrow_equal": engine.execute(typed).to_arrow_table().equals(raw.execute(typed).to_arrow_table()),
        "arrow_via_fetch_arrow": engine.fetch_arrow(typed).num_rows,
        "status": [engine.execute("DELETE FROM counted WHERE id < 10").fetchall(), engine.execute("SET threads = 2").fetchone()],
    }))
    """
)


def test_each_thread_fetches_its_own_statements_result_with_duckdbs_own_types() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["wrong_count"] == 0, report["wrong"]
    assert report["counted"] == 3000
    assert report["rows_equal"] and report["arrow_equal"], report
    assert report["row_types"] == ["UUID", "int", "str", "Decimal", "datetime", "list"]
    assert report["arrow_via_fetch_arrow"] == 1
    assert report["status"] == [[[20]], None]  # DuckDB's Count of a DELETE; SET's empty Success table
