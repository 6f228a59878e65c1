"""The benchmark's own arithmetic: GTID positions compared per domain, and py-spy samples summed per module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.capture_bench import gtid_numbers
from bench.pipeline_bench import profile_summary


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
