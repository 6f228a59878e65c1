"""The BigQuery load-job budget: how many loads a table (and the project) may start, so no quota is exceeded.

BigQuery allows 1,500 load jobs per table per day, failed ones included, and 100,000 per project per day; both
are fixed. Every landed batch of a table costs one load job (its files are coalesced into one), so the budget is
kept as token buckets: per table and for the project, refilled evenly over the day at `(cap - burst) / 86,400`
per second, holding at most `burst` tokens. A quiet table loads each batch at once; a hot one loads at the rate the
cap allows and its files wait to be batched into the next load. No 24-hour window ever starts more than `cap`
load jobs. The caps are settings (`cdc.settings`: CDC_MAX_LOAD_JOBS_PER_TABLE_PER_DAY and _PER_PROJECT_), below
BigQuery's limits to leave room for retries and backfills.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BIGQUERY_TABLE_LIMIT = 1_500
BIGQUERY_PROJECT_LIMIT = 100_000
DAY_SECONDS = 86_400.0


@dataclass
class TokenBucket:
    cap_per_day: int
    tokens: float
    updated: float  # epoch seconds

    @property
    def burst(self) -> int:
        return max(1, self.cap_per_day // 20)

    @property
    def rate(self) -> float:
        return max(self.cap_per_day - self.burst, 1) / DAY_SECONDS

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now

    def seconds_until_token(self) -> float:
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


class LoadBudget:
    """Per-table and project token buckets, kept in the SQS sensor's cursor between ticks."""

    def __init__(self, state: dict[str, Any] | None, now: float, table_cap: int, project_cap: int):
        state = state or {}
        self.now = now
        self.table_cap = table_cap
        self.project = self._bucket(state.get("project"), project_cap)
        self.tables = {
            name: self._bucket(value, table_cap) for name, value in state.get("tables", {}).items()
        }

    def _bucket(self, saved: Any, cap: int) -> TokenBucket:
        bucket = TokenBucket(cap, float(max(1, cap // 20)), self.now)
        if isinstance(saved, list) and len(saved) == 2:
            bucket.tokens, bucket.updated = float(saved[0]), float(saved[1])
        bucket.cap_per_day = cap
        bucket.refill(self.now)
        return bucket

    def take(self, table: str) -> bool:
        """Spend one load job of `table` if both its bucket and the project's have one."""
        bucket = self.tables.setdefault(table, self._bucket(None, self.table_cap))
        if bucket.tokens < 1 or self.project.tokens < 1:
            return False
        bucket.tokens -= 1
        self.project.tokens -= 1
        return True

    def seconds_until_load(self, table: str) -> float:
        bucket = self.tables.setdefault(table, self._bucket(None, self.table_cap))
        return max(bucket.seconds_until_token(), self.project.seconds_until_token())

    def state(self) -> dict[str, Any]:
        full = {
            name for name, b in self.tables.items() if b.tokens >= b.burst
        }  # a full bucket needs no state
        return {
            "project": [round(self.project.tokens, 4), self.now],
            "tables": {
                name: [round(b.tokens, 4), b.updated] for name, b in self.tables.items() if name not in full
            },
        }
