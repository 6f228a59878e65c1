"""`resnapshot_requests`: runs the `resnapshot_table` job for every table the capture asked to re-snapshot - an
`ALTER TABLE` that gives existing rows a value without row events (a column added with a default, NOT NULL or
generated). One run per request (its run_key: table and binlog position). docs/types.md, "Changes without row
events"."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg

from cdc.landing import ControlDocuments, resnapshot_requests
from cdc.mappings import Mappings
from cdc_assets.resources import LandingResource
from cdc_assets.writers import RESNAPSHOT_JOB


def build_resnapshot_request_sensor(mappings: Mappings) -> dg.SensorDefinition:
    @dg.sensor(
        name="resnapshot_requests",
        job_name=RESNAPSHOT_JOB,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Re-snapshots the tables the capture asks for (a column added with a default fills every "
        "existing row without row events).",
    )
    def resnapshot_requests_sensor(
        context: dg.SensorEvaluationContext, landing: LandingResource
    ) -> Iterator[dg.RunRequest | dg.SkipReason]:
        docs = ControlDocuments(landing.s3(), landing.bucket, landing.prefix)
        mapped = {t.source for _, t in mappings.tables()}
        requested = 0
        for cluster in mappings.clusters:
            for request in resnapshot_requests(docs, cluster.cluster):
                if request["table"] not in mapped:
                    continue  # unmapped since
                requested += 1
                yield dg.RunRequest(
                    run_key=f"{request['table']}@{request['position']}",
                    run_config={"ops": {"resnapshot_from_source": {"config": {"table": request["table"]}}}},
                    tags={"cdc/reason": request["reason"][:200], "cdc/requested_at": request["requested_at"]},
                )
        if not requested:
            yield dg.SkipReason("no re-snapshot requested")

    return resnapshot_requests_sensor
