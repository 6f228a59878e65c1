"""The standing_stream_run sensor: keeps a stream run (`cdc_assets.stream_run`) going when CDC_STREAM_RUN_MINUTES
is set - starts one when none is, the next one two minutes before the current one stops taking orders, so that the
next has started by then, and a new one at once when the mappings were deployed over since the current one started
(docs/design.md, "Stream runs")."""

import hashlib
import json
import time

import dagster as dg
from dagster import MAX_RUNTIME_SECONDS_TAG

from cdc.mappings import Mappings
from cdc.settings import STREAM_RUN_MINUTES, Settings
from cdc_assets.stream_run import stream_run_config, stream_runs, streamed_targets, taking_orders_until
from cdc_assets.writers import stream_run_alive

# the next run is requested this long before the current one stops taking orders: enough for a pod or an ECS task
# to start (the current one serves until then)
TAKE_OVER_LEAD_S = 120.0


MAPPINGS_TAG = "cdc/mappings"  # a stream run's tag: the fingerprint of the mappings it was requested with


def mappings_fingerprint(mappings: Mappings, settings: Settings) -> str:
    """What a stream run loads by: the mapped tables and the settings of their loads (a deployed mapping changes it)."""
    tables = [t.model_dump(mode="json") for _, t in mappings.tables()]
    knobs = [settings.load_mode, settings.max_staleness_minutes, settings.max_parallel_loads]
    return hashlib.sha256(json.dumps([tables, knobs], sort_keys=True).encode()).hexdigest()[:16]


def next_stream_run_due(
    instance: dg.DagsterInstance, now: float, minutes: float, fingerprint: str | None = None
) -> bool:
    """No stream run alive, of the current mappings (`fingerprint`), that will still take orders in
    TAKE_OVER_LEAD_S (or half its life, if shorter)."""
    lead = min(TAKE_OVER_LEAD_S, minutes * 30)
    for record in stream_runs(instance, now):
        if not stream_run_alive(instance, record, now):
            continue
        if fingerprint and record.dagster_run.tags.get(MAPPINGS_TAG, fingerprint) != fingerprint:
            continue  # loads by mappings deployed over since: the next one takes over now
        if record.dagster_run.status != dg.DagsterRunStatus.STARTED:
            return False  # the next one is on its way
        if taking_orders_until(record) - now > lead:
            return False
    return True


def build_stream_run_sensor(
    job: dg.JobDefinition, mappings: Mappings, settings: Settings
) -> dg.SensorDefinition:
    minutes = settings.stream_run_minutes
    targets = streamed_targets(mappings, settings)
    fingerprint = mappings_fingerprint(mappings, settings)

    @dg.sensor(
        name="standing_stream_run",
        job=job,
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Keeps a standing stream run going for the streaming-mode tables (CDC_STREAM_RUN_MINUTES).",
    )
    def standing_stream_run(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        if not minutes or not targets:
            return dg.SkipReason(
                f"{STREAM_RUN_MINUTES} is 0 (or no table streams): a load run per batch of files"
            )
        now = time.time()
        if not next_stream_run_due(context.instance, now, minutes, fingerprint):
            return dg.SkipReason("a stream run of the current mappings is taking orders")
        return dg.RunRequest(
            run_key=f"stream-run:{int(now)}",
            run_config=stream_run_config(targets, minutes),
            # run monitoring fails a stream run whose worker died without a word (the heartbeat frees its tables)
            tags={MAX_RUNTIME_SECONDS_TAG: str(int(minutes * 60 + 300)), MAPPINGS_TAG: fingerprint},
        )

    return standing_stream_run
