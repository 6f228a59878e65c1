"""Alerts: three sensors post failed asset checks (WARN and ERROR), failed runs and dead-letter messages to the
Slack-compatible webhook of CDC_ALERT_WEBHOOK_URL (`cdc.alerts`); open-source Dagster has no alert policies.
docs/design.md, "Checks and alerts".
"""

import datetime as dt
import json
import time
from typing import Any

import dagster as dg

from cdc.landing import PoisonMessage, parse_message
from cdc_assets.resources import AlertWebhookResource, LandingResource

DLQ_REMIND_SECONDS = 43_200
MAX_EVENTS_PER_TICK = 200
CHECK_CURSOR_MARGIN_S = 300


def _check_line(entry: Any) -> str | None:
    evaluation = entry.dagster_event.event_specific_data
    if evaluation.passed:
        return None
    key = evaluation.asset_key.to_user_string()
    numbers = ", ".join(
        f"{name}={value.value}"
        for name, value in evaluation.metadata.items()
        if isinstance(value.value, (int, float, str, bool)) and name not in ("overdue", "waiting_for")
    )
    severity = evaluation.severity.value if evaluation.severity else "ERROR"
    description = f" - {evaluation.description}" if evaluation.description else ""
    return (
        f"[{severity}] {key} `{evaluation.check_name}` failed{description} ({numbers}) run {entry.run_id[:8]}"
    )


@dg.sensor(
    name="alert_failed_checks",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts failed asset checks (WARN and ERROR) to the alert webhook.",
)
def alert_failed_checks(context: dg.SensorEvaluationContext, alerts: AlertWebhookResource) -> dg.SkipReason:
    # Read per run (SQLite, the local storage, keeps a separate event log per run whose ids mean nothing across
    # runs): the runs updated since the last look (with a margin), and of each the check evaluations not yet seen.
    # cursor: {"at": when this sensor last looked, "seen": {run id: evaluations already read}}
    state = json.loads(context.cursor) if context.cursor and context.cursor.startswith("{") else {}
    now = time.time()
    since = float(state.get("at", now - CHECK_CURSOR_MARGIN_S)) - CHECK_CURSOR_MARGIN_S
    seen: dict[str, int] = dict(state.get("seen", {}))
    runs = context.instance.get_run_records(
        dg.RunsFilter(updated_after=dt.datetime.fromtimestamp(since, dt.UTC)), limit=MAX_EVENTS_PER_TICK
    )
    lines: list[str] = []
    evaluated = 0
    for record in runs:
        run_id = record.dagster_run.run_id
        events = context.instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        new = events[seen.get(run_id, 0) :]
        seen[run_id] = len(events)
        evaluated += len(new)
        lines += [line for event in new if (line := _check_line(event))]
    if lines:
        alerts.post(f"{len(lines)} failed CDC check(s)", lines, context.log)
    recent = {record.dagster_run.run_id for record in runs}
    context.update_cursor(json.dumps({"at": now, "seen": {k: v for k, v in seen.items() if k in recent}}))
    return dg.SkipReason(f"{evaluated} check evaluation(s), {len(lines)} failed")


@dg.run_failure_sensor(
    name="alert_failed_runs",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts failed runs (loads, checks, backfills) to the alert webhook.",
)
def alert_failed_runs(context: dg.RunFailureSensorContext, alerts: AlertWebhookResource) -> None:
    run = context.dagster_run
    selection = sorted(k.to_user_string() for k in (run.asset_selection or set()))
    partition = run.tags.get("dagster/partition", "")
    lines = [
        f"run {run.run_id} of {run.job_name} failed" + (f" (partition {partition})" if partition else "")
    ]
    if selection:
        lines.append("tables: " + ", ".join(selection[:20]) + (" ..." if len(selection) > 20 else ""))
    for event in context.get_step_failure_events()[:5]:
        error = getattr(event.event_specific_data, "error", None)
        lines.append(f"{event.step_key}: {error_text(error)[:1000] if error else event.message}")
    if not context.get_step_failure_events():
        lines.append(context.failure_event.message or "")
    alerts.post("CDC run failed", lines, context.log)


def error_text(error: Any) -> str:
    """A step error's message with its causes: the root cause (e.g. the loader's LoadError) is what names the
    table, the file and what to do; Dagster's own wrapper only names the step."""
    parts: list[str] = []
    while error is not None:
        message = error.message.strip().removeprefix("dagster._core.definitions.events.Failure: ")
        wrapper = message.startswith("dagster._core.errors.DagsterExecutionStepExecutionError")
        if not wrapper and not any(message in part for part in parts):
            parts.append(message)
        error = error.cause
    return " <- ".join(parts)


DLQ_LINES_PER_POST = 30  # a chat message stays readable; more messages make more posts


def build_dead_letter_alert_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="alert_dead_letters",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Posts messages in the dead-letter queue (poison files, unmapped tables) to the alert webhook.",
    )
    def alert_dead_letters(
        context: dg.SensorEvaluationContext, landing: LandingResource, alerts: AlertWebhookResource
    ) -> dg.SkipReason:
        if not landing.dead_letter_queue_url:
            return dg.SkipReason("no dead-letter queue configured (CDC_SQS_DLQ_URL)")
        now = time.time()
        alerted: dict[str, float] = json.loads(context.cursor) if context.cursor else {}
        messages = landing.dead_letters()
        lines: list[str] = []
        for message in messages:
            if now - alerted.get(message["MessageId"], 0.0) < DLQ_REMIND_SECONDS:
                continue  # posted already; reminded twice a day while it stays in the queue
            alerted[message["MessageId"]] = now
            reason = message.get("MessageAttributes", {}).get("cdc_reason", {}).get("StringValue")
            count = message.get("Attributes", {}).get("ApproximateReceiveCount", "?")
            lines.append(
                f"message {message['MessageId']}: "
                + (reason or f"failed {count} time(s) to load: {_keys(message['Body'])}")
            )
        present = {m["MessageId"] for m in messages}
        context.update_cursor(json.dumps({k: v for k, v in alerted.items() if k in present}))
        for start in range(0, len(lines), DLQ_LINES_PER_POST):  # every message is posted, 30 to a post
            alerts.post(
                f"{len(lines)} message(s) in the dead-letter queue"
                + (
                    f" ({start + 1}-{min(start + DLQ_LINES_PER_POST, len(lines))})"
                    if len(lines) > DLQ_LINES_PER_POST
                    else ""
                ),
                [
                    *lines[start : start + DLQ_LINES_PER_POST],
                    f"queue: {landing.dead_letter_queue_url}; redrive after fixing the cause",
                ],
                context.log,
            )
        return dg.SkipReason(f"{len(lines)} dead-letter message(s)")

    return alert_dead_letters


def _keys(body: str) -> str:
    try:
        parsed = parse_message({"MessageId": "-", "ReceiptHandle": "-", "Body": body})
    except PoisonMessage:
        return body[:300]
    return ", ".join(parsed.keys) or body[:300]
