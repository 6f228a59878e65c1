"""Progress of long work (a full load, a backfill): done of an expected total, the rate, and an ETA, as one line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    what: str  # e.g. "full load of slots_play.bets (rows)"
    total: int | None  # expected total (an estimate is fine); None or 0: unknown
    started: float = field(default_factory=time.monotonic)
    done: int = 0

    def advance(self, count: int) -> str:
        self.done += count
        return self.line()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        if not self.total:
            return f"{self.what}: {self.done:,} done, {rate:,.0f}/s"
        percent = min(100.0, 100.0 * self.done / self.total)
        eta = f", ETA {max(self.total - self.done, 0) / rate:,.0f} s" if rate > 0 else ""
        return f"{self.what}: {self.done:,} of ~{self.total:,} ({percent:.0f} %), {rate:,.0f}/s{eta}"
