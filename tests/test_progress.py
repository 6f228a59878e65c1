"""Progress lines of long work (full loads, backfills)."""

from __future__ import annotations

import re
import time

from cdc.progress import Progress


def test_progress_lines_say_done_of_total_rate_and_eta() -> None:
    progress = Progress("full load of s.t (rows)", 1000, started=time.monotonic() - 2)
    line = progress.advance(250)
    assert line.startswith("full load of s.t (rows): 250 of ~1,000 (25 %), ")
    assert re.search(r"/s, ETA \d+ s$", line)
    eta = int(line.rsplit("ETA ", 1)[1].split()[0].replace(",", ""))
    assert 5 <= eta <= 7  # 750 left at ~125/s
    assert Progress("backfill (files)", None).advance(3).startswith("backfill (files): 3 done, ")
