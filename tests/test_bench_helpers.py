"""The benchmark's own arithmetic: GTID positions compared per domain, py-spy samples summed per module, CPU of
short-lived processes counted once."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.bench_platform import Sampler, component_of
from bench.capture_bench import gtid_numbers
from bench.pipeline_bench import (
    bench_phases,
    key_figures,
    print_beside_published,
    profile_summary,
    report_row,
)


class _Finished:
    returncode = 1

    def wait(self, timeout: float) -> Any:
        return self.returncode


def test_gtid_positions_are_compared_per_domain() -> None:
    assert gtid_numbers("0-1-120,1-1-7") == {"0": 120, "1": 7}
    assert gtid_numbers("") == {}
    assert gtid_numbers(" 0-596811218-8382 ") == {"0": 8382}


def test_profile_self_time_is_shared_per_module(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(  # py-spy's raw format: a stack of "function (module path:line)" frames, then its sample count
        "<module> (local_stack/bigquery_emulator.py:439);parse (sqlglot/parser.py:10) 30\n"
        "<module> (local_stack/bigquery_emulator.py:439);execute (bqemulator/storage/engine.py:5) 50\n"
        "<module> (local_stack/bigquery_emulator.py:439);execute (bqemulator/storage/engine.py:9) 10\n"
        "<module> (local_stack/bigquery_emulator.py:439);wait (threading.py:3) 10\n"
    )
    shares = profile_summary(_Finished(), raw, top=2)
    assert shares == {"bqemulator/storage/engine.py": 60.0, "sqlglot/parser.py": 30.0}
    assert list(shares) == ["bqemulator/storage/engine.py", "sqlglot/parser.py"]


def test_a_missing_profile_is_reported_not_raised(tmp_path: Path) -> None:
    assert profile_summary(_Finished(), tmp_path / "none.txt") == {"(no profile: py-spy exited 1)": 0.0}


_WORKERS = """
import json, resource, subprocess, sys, time
burn = "import time\\nend = time.process_time() + {}\\nwhile time.process_time() < end: pass"
for seconds in (0.3, 1.3, 0.3, 0.3, 1.3, 0.3):  # shorter and longer than the sampling interval
    subprocess.run([sys.executable, "-c", burn.format(seconds)], check=True)
children = resource.getrusage(resource.RUSAGE_CHILDREN)
own = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"children": children.ru_utime + children.ru_stime, "own": own.ru_utime + own.ru_stime}))
sys.stdout.flush()
time.sleep(60)
"""


def test_the_sampler_counts_workers_shorter_than_its_interval_once() -> None:
    """Run workers live shorter than a sampling interval: their CPU must be counted (from the parent's reaped
    children's time) and a worker that was also sampled alive must not be counted twice."""
    sampler = Sampler(None, interval=0.5)
    process = subprocess.Popen(
        [sys.executable, "-c", _WORKERS], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        sampler.register(process.pid, "workers")
        start = time.time()
        sampler.start()
        assert process.stdout is not None
        used = json.loads(process.stdout.readline())
        time.sleep(1.2)  # a sample after the last worker was reaped
        end = time.time()
        sampler.stop()
    finally:
        process.kill()
        process.wait()
    counted = sampler.cpu_seconds(start, end)["workers"]
    expected = used["children"] + used["own"]
    assert used["children"] >= 3.5
    assert 0.85 * expected <= counted <= 1.1 * expected + 0.2, (counted, used)


def test_run_workers_are_told_from_dagster_services_however_they_start() -> None:
    python = "/work/.venv/bin/python3"
    workers = [
        f"{python} -c from multiprocessing.forkserver import main; main(11, 12, ['definitions'], **{{}})",
        f"{python} -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)",
        f"{python} -m dagster api execute_run {{}}",
    ]
    services = [
        f"{python} -m dagster dev -w workspace.yaml",
        f"{python} -m dagster api grpc --lazy-load-user-code",
    ]
    assert {component_of("dagster", command) for command in workers} == {"Dagster run workers"}
    assert {component_of("dagster", command) for command in services} == {"Dagster services"}


def test_memory_of_forked_processes_counts_shared_pages_once() -> None:
    """Run workers are forked from one fork server and share its pages: the sampler must not count them per
    process (RSS would count 150 MB four times here)."""
    script = (
        "import os, time\n"
        "shared = bytearray(os.urandom(1 << 20) * 150)\n"  # 150 MB, written, so resident
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    sampler = Sampler(None)
    try:
        sampler.register(process.pid, "forked")
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        sampler.sample()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    counted_mb = sampler.peak_rss_mb()["forked"]
    assert 150 <= counted_mb <= 250, counted_mb


def test_a_phase_without_a_value_prints_a_dash_not_a_crash() -> None:
    """A 10x run's report crashed at its last line when a phase had no Write API load measured (None)."""
    assert report_row("Write API load (3 appends) p50 (s)", [None, 12.6]).split() == [
        "Write",
        "API",
        "load",
        "(3",
        "appends)",
        "p50",
        "(s)",
        "-",
        "12.6",
    ]


def test_each_key_figure_is_printed_beside_the_published_run_s(tmp_path: Path, capsys: Any) -> None:
    """`make bench` prints its key figures beside those of the run docs/benchmarks.md reports (the targets' figures:
    latency, the stages after landing, rows/s captured, peak PSS of the platform, of our own processes and of the
    capture, capture vs raw decoding); a figure the published run lacks shows a dash."""

    def run(p50: float, capture_mb: float, phases: list[str]) -> dict[str, Any]:
        phase = [
            {
                "phase": p,
                "latency_s": {"p50": p50, "p95": 2 * p50},
                "stages_p50_s": {"after the file landed (pickup + queue + start + load)": p50 - 2},
                "capture_rows_per_s": 459,
            }
            for p in phases
        ]
        memory = {
            "peak_per_component": {
                "capture (6 clusters)": capture_mb,
                "Dagster services": 500.0,
                "Dagster run workers": 400.0,
                "BigQuery server": 900.0,
            },
            "peak_platform_total": capture_mb + 1800.0,
        }
        return {"date": "then", "modes": {"streaming": {"phases": phase, "memory_mb": memory}}}

    figures = key_figures(run(9.5, 178.0, ["1x"]))
    assert figures["streaming 1x: latency p95 (s)"] == 19.0
    assert figures["streaming 1x: after the file landed p50 (s)"] == 7.5
    assert figures["streaming: peak PSS of our own processes (MB)"] == 1078.0  # not the BigQuery server
    published = tmp_path / "pipeline.json"
    published.write_text(json.dumps(run(38.0, 1367.2, ["1x"])))
    print_beside_published(run(9.5, 178.0, ["1x", "10x"]), published)
    lines = {line[:52].strip(): line[52:].split() for line in capsys.readouterr().out.splitlines()}
    assert lines["streaming 1x: latency p50 (s)"] == ["9.50", "38.00"]
    assert lines["streaming: peak PSS of the capture (MB)"] == ["178", "1,367"]
    assert lines["streaming 10x: latency p50 (s)"] == ["9.50", "-"]


def test_a_niced_workload_process_nices_its_sessions_scheduling_group_too() -> None:
    """With autogroup scheduling (Debian's default) a process's niceness only counts inside its own session, and the
    benchmark starts each workload process in a session of its own: its session's group has to be niced as well."""
    code = (
        "import os, sys; from bench.pipeline_bench import yield_autogroup; "
        "yield_autogroup(os.getpid(), 10); print(open(f'/proc/{os.getpid()}/autogroup').read())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, start_new_session=True
    )
    assert done.stdout.strip().endswith("nice 10"), done.stdout


def test_the_phase_hold_capture_names_runs_with_the_capture_held_and_says_so_in_its_name() -> None:
    """`--hold-capture 10`: the 10x phase's workload writes with the capture stopped, which then replays it (its
    end-to-end latency includes the hold, so its name says so); the other phases run as always."""
    args = argparse.Namespace(
        multiples="1,10", phase_seconds=60.0, burst_multiple=20.0, burst_seconds=15.0, hold_capture=10.0
    )
    phases = bench_phases(args)
    assert [(p.name, p.multiple, p.held) for p in phases] == [
        ("1x", 1.0, False),
        ("10x held", 10.0, True),
        ("burst 20x", 20.0, False),
    ]
    args.hold_capture = None
    assert [(p.name, p.held) for p in bench_phases(args)][:2] == [("1x", False), ("10x", False)]
