"""The demo workload: a realistic mix of inserts, updates and deletes across every cluster's tables.

Values are generated from each column's MySQL type and include the edge values that break naive pipelines
(BIGINT UNSIGNED max, negative fractional TIME, empty SET and VARBINARY, zero dates, emoji and Korean text,
DECIMAL at full precision). Changes go out at a steady overall rate in small transactions, as a game backend's
would; a primary-key change happens now and then (leaderboards move a player to another board).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pymysql

from local_stack.demo_schema import DemoCluster, DemoTable, demo_clusters

UINT64_MAX = 2**64 - 1
TEXTS = ("ace", "Lucky 🍀", "라이언", "çà va", "🎰🎰🎰", "O'Brien", "back\\slash", "", "δ-player", "名人")
JSON_VALUES: tuple[Any, ...] = (
    {"k": 1},
    {"nested": {"a": [1, 2, 3]}, "emoji": "🎲"},
    [],
    {"big": 2**63},
    {"s": 'quote"d'},
)

ValueFn = Callable[[random.Random], Any]


def value_generator(definition: str) -> ValueFn:
    """A function giving random values (edge values included) for one MySQL column definition."""
    name, sql_type = definition.split()[0], definition.split(None, 1)[1].upper()
    nullable = "NOT NULL" not in sql_type
    base = _base_generator(name, sql_type)

    def generate(rng: random.Random) -> Any:
        if nullable and rng.random() < 0.1:
            return None
        return base(rng)

    return generate


def _members(sql_type: str) -> list[str]:
    return re.findall(r"'([^']*)'", sql_type.split(")")[0] + ")")


def _base_generator(name: str, sql_type: str) -> ValueFn:
    unsigned = "UNSIGNED" in sql_type
    if sql_type.startswith("BIGINT"):
        if name.endswith("_id"):
            return lambda rng: rng.randint(1, 50_000)
        if unsigned:
            return lambda rng: rng.choice((0, UINT64_MAX, 2**63, rng.randint(0, 10**12)))
        return lambda rng: rng.choice((-(2**63), 2**63 - 1, rng.randint(-(10**9), 10**9)))
    if sql_type.startswith("TINYINT(1)"):
        return lambda rng: rng.randint(0, 1)
    if sql_type.startswith("TINYINT"):
        return lambda rng: rng.randint(0, 255) if unsigned else rng.randint(-128, 127)
    if sql_type.startswith("SMALLINT"):
        return lambda rng: rng.randint(0, 65535) if unsigned else rng.randint(-32768, 32767)
    if sql_type.startswith("INT"):
        return lambda rng: (
            rng.choice((0, 2**32 - 1, rng.randint(0, 100_000)))
            if unsigned
            else rng.randint(-(2**31), 2**31 - 1)
        )
    if sql_type.startswith("BIT(1)"):
        return lambda rng: rng.randint(0, 1)
    if sql_type.startswith("BIT"):
        bits = int(re.match(r"BIT\((\d+)\)", sql_type).group(1))  # type: ignore[union-attr]
        return lambda rng: rng.choice((0, 2**bits - 1, rng.randint(0, 2**bits - 1)))
    if sql_type.startswith("DECIMAL"):
        precision, scale = map(int, re.match(r"DECIMAL\((\d+),(\d+)\)", sql_type).groups())  # type: ignore[union-attr]
        limit = 10 ** (precision - scale) - 1

        def decimal(rng: random.Random) -> Decimal:
            if rng.random() < 0.05:
                return Decimal(f"{limit}.{'9' * scale}") * rng.choice((1, -1))
            return Decimal(rng.randint(-(10**6), 10**8)).scaleb(-scale)

        return decimal
    if sql_type.startswith("DOUBLE") or sql_type.startswith("FLOAT"):
        return lambda rng: rng.choice((0.0, -1.5e-300, 1e308, rng.uniform(-1000, 1000)))
    if sql_type.startswith("DATETIME") or sql_type.startswith("TIMESTAMP"):
        zero_allowed = "'0000-00-00" in sql_type

        def when(rng: random.Random) -> Any:
            if zero_allowed and rng.random() < 0.2:
                return "0000-00-00 00:00:00"
            base = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            return base - dt.timedelta(
                seconds=rng.randint(0, 86_400 * 30), microseconds=rng.randint(0, 999_999)
            )

        return when
    if sql_type.startswith("DATE"):
        zero_allowed = "'0000-00-00'" in sql_type
        return lambda rng: (
            "0000-00-00"
            if zero_allowed and rng.random() < 0.2
            else dt.date(2026, 1, 1) + dt.timedelta(days=rng.randint(-3650, 700))
        )
    if sql_type.startswith("TIME"):
        return lambda rng: rng.choice(
            (
                "-00:00:00.000001",
                "838:59:59",
                "-838:59:59",
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:07.25",
            )
        )
    if sql_type.startswith("YEAR"):
        return lambda rng: 0 if rng.random() < 0.05 else rng.randint(1990, 2030)  # 0: the zero year 0000
    if sql_type.startswith("ENUM"):
        members = _members(sql_type)
        return lambda rng: rng.choice(members)
    if sql_type.startswith("SET"):
        members = _members(sql_type)
        return lambda rng: ",".join(m for m in members if rng.random() < 0.4)  # '' (empty SET) is common
    if sql_type.startswith("JSON"):
        return lambda rng: json.dumps(rng.choice(JSON_VALUES), ensure_ascii=False)
    if sql_type.startswith("VARBINARY") or sql_type.startswith("BLOB"):
        size = int(re.match(r"VARBINARY\((\d+)\)", sql_type).group(1)) if "(" in sql_type else 64  # type: ignore[union-attr]
        return lambda rng: rng.choice((b"", b"\x00\xff", rng.randbytes(rng.randint(1, size))))
    if sql_type.startswith("CHAR(2)"):
        return lambda rng: rng.choice(("KR", "DE", "MT", "GB", "BR"))
    if sql_type.startswith(("CHAR", "VARCHAR", "TEXT")):
        return lambda rng: f"{rng.choice(TEXTS)}{rng.randint(0, 9999)}"
    raise ValueError(f"no value generator for column {name} {sql_type}")


@dataclass
class _TableDriver:
    """Keeps the keys of rows this workload can update or delete in one table."""

    cluster: DemoCluster
    table: DemoTable
    generators: dict[str, ValueFn]
    keys: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def writable_columns(self) -> list[str]:
        skip = {"id", "created_at", "updated_at"}
        return [c for c in self.table.column_names if c not in skip]

    @property
    def qualified(self) -> str:
        return f"`{self.cluster.schema}`.`{self.table.name}`"


@dataclass
class WorkloadReport:
    changes: Counter[str] = field(default_factory=Counter)
    per_cluster: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.changes.values())


class Workload:
    def __init__(
        self,
        connect: Callable[[DemoCluster], pymysql.connections.Connection],
        clusters: list[DemoCluster] | None = None,
        seed: int | None = None,
    ):
        self.clusters = clusters or demo_clusters()
        self.rng = random.Random(seed)
        self.connections = {cluster.name: connect(cluster) for cluster in self.clusters}
        self.drivers = [
            _TableDriver(cluster, table, {c.split()[0]: value_generator(c) for c in table.columns})
            for cluster in self.clusters
            for table in cluster.tables
        ]
        self.weights = [driver.table.weight for driver in self.drivers]
        self.by_cluster = {c.name: [d for d in self.drivers if d.cluster is c] for c in self.clusters}

    def ensure_schemas(self) -> None:
        for cluster in self.clusters:
            connection = self.connections[cluster.name]
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{cluster.schema}` CHARACTER SET utf8mb4")
                for table in cluster.tables:
                    cursor.execute(table.ddl(cluster.schema))
            connection.commit()
        for driver in self.drivers:
            self._load_keys(driver)

    def _load_keys(self, driver: _TableDriver) -> None:
        key = ", ".join(f"`{c}`" for c in driver.table.primary_key)
        with self.connections[driver.cluster.name].cursor() as cursor:
            cursor.execute(f"SELECT {key} FROM {driver.qualified} ORDER BY RAND() LIMIT 2000")  # noqa: S608
            driver.keys = [tuple(row) for row in cursor.fetchall()]

    def _insert(self, cursor: Any, driver: _TableDriver) -> None:
        columns = driver.writable_columns
        values = [driver.generators[c](self.rng) for c in columns]
        if driver.table.primary_key == ("player_id",) or "id" not in driver.table.column_names:
            # Natural keys: make collisions with existing rows an upsert, as game backends do.
            updates = ", ".join(
                f"`{c}` = VALUES(`{c}`)" for c in columns if c not in driver.table.primary_key
            )
            suffix = f" ON DUPLICATE KEY UPDATE {updates}"
        else:
            suffix = ""
        placeholders = ", ".join(["%s"] * len(columns))
        cursor.execute(
            f"INSERT INTO {driver.qualified} ({', '.join(f'`{c}`' for c in columns)}) VALUES ({placeholders}){suffix}",  # noqa: S608
            values,
        )
        if "id" in driver.table.column_names:
            driver.keys.append((cursor.lastrowid,))
        else:
            driver.keys.append(tuple(values[columns.index(c)] for c in driver.table.primary_key))
        if len(driver.keys) > 5000:
            del driver.keys[: len(driver.keys) - 5000]

    @staticmethod
    def _where(driver: _TableDriver) -> str:
        return " AND ".join(f"`{c}` = %s" for c in driver.table.primary_key)

    def _update(self, cursor: Any, driver: _TableDriver) -> str:
        key = self.rng.choice(driver.keys)
        if driver.table.name == "leaderboards" and self.rng.random() < 0.3:
            # A primary-key change: the player moves to another board.
            new_board = f"board{self.rng.randint(0, 99)}"
            cursor.execute(
                f"UPDATE IGNORE {driver.qualified} SET `board` = %s WHERE {self._where(driver)}",  # noqa: S608
                (new_board, *key),
            )
            driver.keys.remove(key)
            driver.keys.append((new_board, key[1]))
            return "pk_change"
        columns = [c for c in driver.writable_columns if c not in driver.table.primary_key]
        chosen = self.rng.sample(columns, k=min(len(columns), self.rng.randint(1, 3)))
        assignments = ", ".join(f"`{c}` = %s" for c in chosen)
        cursor.execute(
            f"UPDATE {driver.qualified} SET {assignments} WHERE {self._where(driver)}",  # noqa: S608
            (*[driver.generators[c](self.rng) for c in chosen], *key),
        )
        return "update"

    def _delete(self, cursor: Any, driver: _TableDriver) -> None:
        key = driver.keys.pop(self.rng.randrange(len(driver.keys)))
        cursor.execute(f"DELETE FROM {driver.qualified} WHERE {self._where(driver)}", key)  # noqa: S608

    def change(self, cursor: Any, driver: _TableDriver) -> str:
        roll = self.rng.random()
        if driver.table.append_only or not driver.keys or roll < 0.55:
            self._insert(cursor, driver)
            return "insert"
        if roll < 0.9:
            return self._update(cursor, driver)
        self._delete(cursor, driver)
        return "delete"

    def run(self, rate: float, duration: float, transaction_size: int = 5) -> WorkloadReport:
        """Drive ``rate`` changes per second in total for ``duration`` seconds."""
        report = WorkloadReport()
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < duration:
            due = int(rate * elapsed) - report.total
            if due <= 0:
                time.sleep(min(0.02, max(0.0, (report.total + 1) / rate - elapsed)))
                continue
            driver = self.rng.choices(self.drivers, weights=self.weights)[0]
            connection = self.connections[driver.cluster.name]
            with connection.cursor() as cursor:
                for _ in range(min(due, transaction_size)):
                    op = self.change(cursor, driver)
                    report.changes[op] += 1
                    report.per_cluster[driver.cluster.name] += 1
                    driver = self.rng.choice(self.by_cluster[driver.cluster.name])
            connection.commit()
        report.seconds = time.monotonic() - start
        return report

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()


def run_on_stack(
    stack: Any, rate: float, duration: float, clusters: tuple[str, ...] = (), seed: int | None = None
) -> WorkloadReport:
    """Create the demo schemas where needed and drive the workload on the local stack's clusters (as their admin
    account). Unknown cluster names raise ValueError; an unreachable server raises ConnectionError."""
    chosen = [c for c in demo_clusters() if not clusters or c.name in clusters]
    unknown = set(clusters) - {c.name for c in chosen}
    if unknown:
        raise ValueError(f"unknown cluster(s): {', '.join(sorted(unknown))}")

    def connect(cluster: DemoCluster) -> pymysql.connections.Connection:
        user, password = stack.admin_credentials(cluster.name)
        return stack.mariadb(cluster.name).connect(user, password)

    try:
        driver = Workload(connect, chosen, seed=seed)
    except Exception as exc:
        raise ConnectionError(
            f"cannot connect to the local MariaDB servers ({exc}); run `cdc stack up`"
        ) from exc
    try:
        driver.ensure_schemas()
        return driver.run(rate=rate, duration=duration)
    finally:
        driver.close()
