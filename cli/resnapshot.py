"""`cdc resnapshot`: the resnapshot_table job run here, recorded in the Dagster instance (cdc_assets.resnapshot
owns the job)."""

from __future__ import annotations

import click

from cdc_assets.writers import RESNAPSHOT_JOB
from cli.common import config, platform_mappings
from definitions import build_definitions
from local_stack.dagster import open_instance
from sensors.alerts import error_text


@click.command("resnapshot")
@click.argument("table", required=False)
@click.option(
    "--cluster", default=None, help="Every table of this cluster that has a primary key, one by one."
)
def command(table: str | None, cluster: str | None) -> None:
    """Re-snapshot TABLE (its BigQuery target or source name), or every table of --cluster, from the source: the
    resnapshot_table job, run here.

    The runs are recorded in the Dagster instance of DAGSTER_HOME (locally: the one `cdc dagster start` runs)."""
    if (table is None) == (cluster is None):
        raise click.UsageError("name a TABLE or a --cluster (not both)")
    if cluster is not None:
        try:
            tables = [t.target for t in platform_mappings().cluster(cluster).enabled_tables if t.primary_key]
        except KeyError as exc:
            raise click.ClickException(str(exc.args[0])) from exc
    else:
        tables = [str(table)]
    current = config()
    instance = open_instance(current)
    job = build_definitions(current).resolve_job_def(RESNAPSHOT_JOB)
    for name in tables:
        result = job.execute_in_process(
            run_config={"ops": {"resnapshot_from_source": {"config": {"table": name}}}},
            instance=instance,
            raise_on_error=False,
        )
        if not result.success:
            failure = result.failure_data_for_node("resnapshot_from_source")
            reason = error_text(failure.error) if failure else ""
            raise click.ClickException(f"re-snapshot of {name} failed: {reason or 'see the run log'}")
        [materialization] = result.asset_materializations_for_node("resnapshot_from_source")
        values = {key: entry.value for key, entry in materialization.metadata.items()}
        click.echo(
            f"{name}: re-snapshot loaded {values['rows']} row(s) from {values['files']} file(s) at binlog "
            f"{values['snapshot_position']} (run {result.run_id})"
        )
