"""The alert sensors against the storage the local platform really uses: SQLite, whose event log is sharded by run."""

from __future__ import annotations

import dagster as dg

from sensors.alerts import AlertWebhookResource, alert_failed_checks
from tests.support.webhook import Receiver


@dg.asset
def orders() -> None:
    return None


@dg.asset_check(asset=orders)
def orders_match_source() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, metadata={"source_rows": 5, "bigquery_rows": 4})


def test_every_failed_check_is_posted_once_tick_after_tick_on_sqlite_storage(receiver: Receiver) -> None:
    resources = {"alerts": AlertWebhookResource(url=receiver.url)}
    with (
        dg.instance_for_test() as instance
    ):  # SQLite storage in a temporary DAGSTER_HOME, as `cdc dagster start`
        cursor = None
        for tick in range(1, 4):
            dg.materialize([orders, orders_match_source], instance=instance)
            context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
            alert_failed_checks(context)
            cursor = context.cursor
            assert receiver.texts().count("orders_match_source` failed") == tick, receiver.texts()
        assert "source_rows=5" in receiver.texts() and "bigquery_rows=4" in receiver.texts()
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        alert_failed_checks(context)  # nothing new: nothing posted again
        assert receiver.texts().count("orders_match_source` failed") == 3
