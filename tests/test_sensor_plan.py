"""The SQS sensor's plan for a tick, in plain Python: tables in flight keep their files (merged into their next run),
free tables load now, batch-mode tables within their load-job budget."""

from __future__ import annotations

from pathlib import Path

from cdc.mappings import ClusterMapping, Mappings, TableMapping
from cdc.settings import Settings
from cdc_assets.lineage import bigquery_asset_key
from sensors.sqs_sensor import QueuedFiles, plan_tick, run_requests

STREAMED = TableMapping(source="db.bets", target="game.bets", primary_key=["id"])
BATCHED = TableMapping(source="db.rounds", target="game.rounds", primary_key=["id"], load_mode="batch")
MAPPINGS = Mappings(
    Path("."),
    (
        ClusterMapping.model_validate(
            {
                "cluster": "game",
                "connection": {"host_env": "H", "port_env": "P", "user_env": "U", "password_env": "W"},
                "tables": [STREAMED.model_dump(), BATCHED.model_dump()],
            }
        ),
    ),
)
SETTINGS = Settings(mappings_dir=Path("."), state_dir=Path("."), max_load_jobs_per_table_per_day=40)


def files(table: TableMapping, name: str) -> QueuedFiles:
    key = f"cdc/db/{table.source_table}/2026/11/30/{name}.parquet"
    return QueuedFiles(table, "2026-11-30", {key}, {f"m-{name}": f"r-{name}"}, {f"m-{name}": 1})


def test_a_table_in_flight_keeps_its_files_for_its_next_run() -> None:
    busy = {bigquery_asset_key(STREAMED)}
    plan = plan_tick([files(STREAMED, "a"), files(BATCHED, "b")], {}, MAPPINGS, 1_000.0, busy, SETTINGS)
    assert [f.table.target for f in plan.ready] == ["game.rounds"]  # the other table loads now
    assert [f.table.target for f in plan.in_flight] == ["game.bets"]
    # next tick, its run ended: what it kept and what landed meanwhile go into one run
    plan = plan_tick([files(STREAMED, "c")], plan.cursor, MAPPINGS, 1_005.0, set(), SETTINGS)
    [ready] = plan.ready
    assert (
        ready.table.target == "game.bets" and len(ready.keys) == 2 and set(ready.receipts) == {"m-a", "m-c"}
    )
    assert plan.cursor["held"] == []


def test_only_batch_tables_spend_load_jobs() -> None:
    cursor: dict[str, object] = {}
    loaded = {"game.bets": 0, "game.rounds": 0}
    for tick in range(10):  # a batch each tick for both tables; burst of the 40/day cap: 2
        plan = plan_tick(
            [files(STREAMED, f"s{tick}"), files(BATCHED, f"b{tick}")],
            cursor,
            MAPPINGS,
            1_000.0 + tick,
            set(),
            SETTINGS,
        )
        for ready in plan.ready:
            loaded[ready.table.target] += 1
        cursor = plan.cursor
    assert loaded == {"game.bets": 10, "game.rounds": 2}  # streaming has no load-job budget
    assert cursor["held"] and cursor["held"][0]["table"] == "db.rounds"


def test_only_batch_tables_carry_the_inline_duplicate_check() -> None:
    [request] = run_requests([files(STREAMED, "a"), files(BATCHED, "b")], {"game.rounds"})
    assert {k.asset_key for k in request.asset_check_keys or []} == {bigquery_asset_key(BATCHED)}
    assert set(request.asset_selection or []) == {bigquery_asset_key(STREAMED), bigquery_asset_key(BATCHED)}
