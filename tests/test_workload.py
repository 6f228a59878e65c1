"""The demo workload creates the 70 tables and writes the mix and the edge values the pipeline must survive."""

from __future__ import annotations

import random
import re

import pymysql
import pytest

from cdc.settings import STATE_DIR
from local_stack.demo_schema import demo_clusters
from local_stack.stack import LocalStack
from local_stack.workload import UINT64_MAX, value_generator
from tests.support.commands import run_cdc


def _admin(stack: LocalStack, cluster: str) -> pymysql.connections.Connection:
    user, password = stack.admin_credentials(cluster)
    return stack.mariadb(cluster).connect(user, password)


RATE = 800  # changes per second per cluster asked (what it reaches is the benchmark's to measure)


@pytest.fixture(scope="module")
def workload_output(local_stack: LocalStack) -> str:
    result = run_cdc(
        "workload",
        "--rate",
        str(RATE),
        "--duration",
        "6",
        "--seed",
        "7",
        env={STATE_DIR: str(local_stack.state_dir)},
    )
    return result.stdout


def test_workload_reports_its_rate_and_mix(workload_output: str) -> None:
    match = re.search(r"workload: (\d+) changes in ([\d.]+) s \((\d+)/s\) across 6 clusters", workload_output)
    assert match, workload_output
    changes, seconds, rate = int(match[1]), float(match[2]), int(match[3])
    assert (
        changes > 0 and abs(rate - changes / seconds) <= 0.02 * rate + 1
    )  # the rate reported is what it wrote
    for op in ("insert", "update", "delete", "pk_change"):
        assert re.search(rf"\b{op} [1-9]\d*", workload_output), f"no {op} in: {workload_output}"


def test_every_mapped_table_exists_with_rows(local_stack: LocalStack, workload_output: str) -> None:
    empty = []
    for cluster in demo_clusters():
        with _admin(local_stack, cluster.name) as connection, connection.cursor() as cursor:
            for table in cluster.tables:
                cursor.execute(f"SELECT COUNT(*) FROM `{cluster.schema}`.`{table.name}`")
                if cursor.fetchone()[0] == 0:
                    empty.append(f"{cluster.schema}.{table.name}")
    assert len([c for c in demo_clusters() for _ in c.tables]) == 70
    assert empty == []


EDGE_VALUE_QUERIES = {
    "BIGINT UNSIGNED max": f"SELECT COUNT(*) FROM {{play}}.rounds WHERE rng_seed = {UINT64_MAX}",
    "negative fractional TIME": "SELECT COUNT(*) FROM {accounts}.sessions WHERE idle_time = '-00:00:00.000001'",
    "zero DATETIME": "SELECT COUNT(*) FROM {play}.jackpots WHERE CAST(last_won_at AS CHAR) = '0000-00-00 00:00:00'",
    "zero DATE": "SELECT COUNT(*) FROM {accounts}.bonuses WHERE CAST(valid_to AS CHAR) = '0000-00-00'",
    "empty SET": "SELECT COUNT(*) FROM {accounts}.players WHERE marketing_opt_in = ''",
    "empty VARBINARY": "SELECT COUNT(*) FROM {play}.spins WHERE reels = ''",
    "utf8mb4 emoji": "SELECT COUNT(*) FROM {accounts}.player_profiles WHERE nickname LIKE '%🍀%'",
    "Korean text": "SELECT COUNT(*) FROM {accounts}.players WHERE username LIKE '%라이언%'",
    "BIT(1) set": "SELECT COUNT(*) FROM {accounts}.players WHERE kyc_verified = b'1'",
    "JSON": "SELECT COUNT(*) FROM {play}.game_events WHERE JSON_EXTRACT(payload, '$.emoji') = '🎲'",
    "DECIMAL at full precision": "SELECT COUNT(*) FROM {play}.bets WHERE ABS(stake) = 99999999999999.9999",
}


@pytest.mark.parametrize("edge", list(EDGE_VALUE_QUERIES))
def test_edge_values_reach_the_source(local_stack: LocalStack, workload_output: str, edge: str) -> None:
    found = 0
    for game in ("slots", "poker", "roulette"):
        sql = EDGE_VALUE_QUERIES[edge].format(accounts=f"{game}_accounts", play=f"{game}_play")
        cluster = f"{game}_play" if "{play}" in EDGE_VALUE_QUERIES[edge] else f"{game}_accounts"
        with _admin(local_stack, cluster) as connection, connection.cursor() as cursor:
            cursor.execute(sql)
            found += cursor.fetchone()[0]
    assert found > 0, f"the workload wrote no {edge}"


@pytest.mark.parametrize(
    ("definition", "expected"),
    [
        ("points BIGINT UNSIGNED NOT NULL", UINT64_MAX),
        ("idle_time TIME(6) NULL", "-00:00:00.000001"),
        ("marketing SET('email','sms') NOT NULL", ""),
        ("reels VARBINARY(16) NOT NULL", b""),
        ("valid_to DATE NOT NULL DEFAULT '0000-00-00'", "0000-00-00"),
        ("email VARCHAR(255) NULL", None),
    ],
)
def test_value_generators_produce_the_edge_values(definition: str, expected: object) -> None:
    generate = value_generator(definition)
    rng = random.Random(1)
    assert expected in {generate(rng) for _ in range(500)}
