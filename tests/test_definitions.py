"""The Dagster code location loads from the mappings: one source asset per mapped table, grouped per cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import dagster as dg
import pytest

from cdc.settings import MAPPINGS_DIR
from definitions import build_definitions

ROOT = Path(__file__).resolve().parent.parent


def test_one_source_asset_per_mapped_table_grouped_per_cluster() -> None:
    specs = [s for s in build_definitions().resolve_all_asset_specs() if s.key.path[0] == "mysql"]
    assert len(specs) == 70
    spec = next(s for s in specs if s.key == dg.AssetKey(["mysql", "slots_play", "slots_play", "bets"]))
    assert spec.group_name == "slots_play"
    assert spec.metadata["target"] == "slots.bets"
    assert "mysql" in spec.kinds


def test_adding_a_table_to_a_mapping_file_adds_its_asset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = json.loads((ROOT / "mappings" / "poker_play.json").read_text())
    document["tables"].append(
        {"source": "poker_play.side_pots", "target": "poker.side_pots", "primary_key": ["id"]}
    )
    (tmp_path / "poker_play.json").write_text(json.dumps(document))
    monkeypatch.setenv(MAPPINGS_DIR, str(tmp_path))
    keys = {spec.key for spec in build_definitions().resolve_all_asset_specs()}
    assert dg.AssetKey(["mysql", "poker_play", "poker_play", "side_pots"]) in keys
    assert dg.AssetKey(["s3_landing", "poker_play", "poker_play", "side_pots"]) in keys
    assert dg.AssetKey(["bigquery", "poker", "side_pots"]) in keys
    assert len(keys) == 3 * len(document["tables"])  # source, landing, BigQuery per table


def test_the_workspace_file_loads_with_the_dagster_cli() -> None:
    dagster = Path(sys.executable).with_name("dagster")
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_table_has_its_checks_freshness_alerts_and_the_checks_rotation() -> None:
    defs = build_definitions()
    checks = {key for key in defs.resolve_asset_graph().asset_check_keys}
    bets = dg.AssetKey(["bigquery", "slots", "bets"])
    assert {c.name for c in checks if c.asset_key == bets} == {
        "no_duplicate_changes",
        "row_count_matches_source",
        "content_matches_source",
        "landed_files_loaded",
    }
    assert len(checks) == 4 * 70
    spec = next(s for s in defs.resolve_all_asset_specs() if s.key == bets)
    assert spec.freshness_policy is not None
    sensors = {s.name for s in defs.sensors or []}
    assert sensors == {
        "landed_files_sqs",
        "alert_failed_checks",
        "alert_failed_runs",
        "alert_dead_letters",
        "resnapshot_requests",
        "table_checks_rotation",
        "standing_stream_run",
    }
    assert not list(defs.schedules or [])
    assert len(defs.resolve_job_def("table_checks").asset_layer.asset_graph.asset_check_keys) == 4 * 70


def test_a_stream_run_is_kept_going_only_when_stream_runs_are_on(monkeypatch: pytest.MonkeyPatch) -> None:
    with dg.instance_for_test() as instance:
        monkeypatch.setenv("CDC_STREAM_RUN_MINUTES", "0")
        keeper = build_definitions().resolve_sensor_def("standing_stream_run")
        skipped = keeper(dg.build_sensor_context(instance=instance))
        assert isinstance(skipped, dg.SkipReason) and "CDC_STREAM_RUN_MINUTES is 0" in str(
            skipped.skip_message
        )
        monkeypatch.setenv("CDC_STREAM_RUN_MINUTES", "4")
        defs = build_definitions()
        request = defs.resolve_sensor_def("standing_stream_run")(dg.build_sensor_context(instance=instance))
        assert isinstance(request, dg.RunRequest)
        config = request.run_config["ops"]["stream_tables"]["config"]
        assert config["minutes"] == 4.0 and len(config["tables"]) == 70 and "slots.bets" in config["tables"]
        assert request.tags[dg.MAX_RUNTIME_SECONDS_TAG] == str(4 * 60 + 300)
        assert defs.resolve_job_def("stream_landed_files").tags["cdc/stream"] == "true"
        monkeypatch.setenv("CDC_LOAD_MODE", "batch")  # no table streams: no stream run
        keeper = build_definitions().resolve_sensor_def("standing_stream_run")
        assert isinstance(keeper(dg.build_sensor_context(instance=instance)), dg.SkipReason)


def test_the_sqs_sensor_ticks_on_every_loop_of_dagster_s_sensor_daemon() -> None:
    """The daemon loops every 5 s and starts a sensor's tick when its last tick began at least the sensor's minimum
    interval ago (Dagster's own `is_under_min_interval`). A tick begins on a thread a little after its loop began, so
    at the next loop it began less than 5 s ago: the SQS sensor must still be due then, or it ticks every 10 s."""
    from types import SimpleNamespace

    from dagster._core.scheduler.instigation import SensorInstigatorData
    from dagster._daemon.sensor import MIN_INTERVAL_LOOP_TIME, get_current_timestamp, is_under_min_interval

    sensor = build_definitions().resolve_sensor_def("landed_files_sqs")
    for began_ago in (MIN_INTERVAL_LOOP_TIME - 0.5, MIN_INTERVAL_LOOP_TIME - 2.0):
        state = SimpleNamespace(  # what the daemon reads of the sensor's state and definition
            instigator_data=SensorInstigatorData(
                last_tick_start_timestamp=get_current_timestamp() - began_ago
            )
        )
        remote = SimpleNamespace(min_interval_seconds=sensor.minimum_interval_seconds)
        assert not is_under_min_interval(cast(Any, state), cast(Any, remote)), began_ago


def test_the_table_checks_rotate_a_few_tables_a_minute_each_table_once_per_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CDC_TABLE_CHECKS_CYCLE_MINUTES", "15")
    defs = build_definitions()
    sensor = defs.resolve_sensor_def("table_checks_rotation")
    assert sensor.minimum_interval_seconds == 60
    with dg.instance_for_test() as instance:
        cursor = None
        launched: list[dg.RunRequest] = []
        for _ in range(16):  # a whole cycle and the first group of the next
            context = dg.build_sensor_context(instance=instance, cursor=cursor)
            [request] = sensor.evaluate_tick(context).run_requests
            launched.append(request)
            cursor = context.cursor
        groups = [set(r.asset_check_keys or []) for r in launched]
        tables_per_group = [len({key.asset_key for key in group}) for group in groups[:15]]
        assert sorted(tables_per_group) == [4] * 5 + [5] * 10  # 70 tables over 15 minutes
        assert all(len(group) == 4 * n for group, n in zip(groups, tables_per_group, strict=False))
        assert set().union(*groups[:15]) == defs.resolve_asset_graph().asset_check_keys  # every check once...
        assert sum(len(group) for group in groups[:15]) == 4 * 70  # ...and only once per cycle
        assert groups[15] == groups[0]
        assert len({r.run_key for r in launched}) == 16
        assert launched[2].tags["cdc/checks_group"] == "3/15"
        # a group waits while a checks run is in progress: the rotation slows down and skips no table
        run = instance.create_run_for_job(
            defs.resolve_job_def("table_checks"), status=dg.DagsterRunStatus.STARTED
        )
        context = dg.build_sensor_context(instance=instance, cursor=cursor)
        result = sensor.evaluate_tick(context)
        assert not result.run_requests and run.run_id in str(result.skip_message)
        assert context.cursor == cursor
        instance.report_run_failed(run)
        [request] = sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, cursor=cursor)
        ).run_requests
        assert set(request.asset_check_keys or []) == groups[1]


def test_sensor_ticks_share_the_process_s_dagster_instance_and_resources_make_no_boto3_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dagster opens the instance from its reference at each tick of a sensor with resources and disposes of it
    after (with SQLite: every migration script read again); the landing resource is handed to a tick as itself,
    not as a new boto3 client from a new session (S3Resource's default)."""
    from dagster._core.definitions.sensor_definition import SensorEvaluationContext

    from cdc_assets.resources import LandingResource

    build_definitions()  # installs sensors.shared_instance
    opened: list[object] = []
    stock = dg.DagsterInstance.from_ref

    def from_ref(ref: object) -> dg.DagsterInstance:
        opened.append(ref)
        return stock(ref)  # type: ignore[arg-type]

    monkeypatch.setattr(dg.DagsterInstance, "from_ref", from_ref)
    landing = LandingResource(bucket="b", endpoint_url="http://127.0.0.1:1", region_name="us-east-1")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        seen = []
        for _ in range(3):  # three ticks
            with SensorEvaluationContext(
                instance_ref=instance.get_ref(), resources={"landing": landing}
            ) as tick:
                assert isinstance(tick.resources.landing, LandingResource)  # not an S3 client
                seen.append(tick.instance)
        assert len(opened) == 1 and seen[0] is seen[1] is seen[2]
        assert seen[2].get_runs() == []  # not disposed of by the ticks that ended
