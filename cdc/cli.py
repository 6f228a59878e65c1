"""`cdc`: the user's entry point to the platform (local stack, mappings, demo workload)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cdc import environment
from cdc.mappings import MappingError, Mappings, load_mappings, write_json_schema

if TYPE_CHECKING:  # the local stack is an optional extra; production installs do not need it
    from local_stack.stack import LocalStack, ServiceStatus


def _mappings(path: Path | None = None) -> Mappings:
    try:
        return load_mappings(path)
    except MappingError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Near-real-time MySQL -> BigQuery change data capture on Dagster."""


# -- mappings --------------------------------------------------------------------------------------------------


@main.group()
def mappings() -> None:
    """Table mappings: one JSON file per cluster in the mappings folder (CDC_MAPPINGS_DIR)."""


@mappings.command("validate")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def mappings_validate(path: Path | None) -> None:
    """Validate every mapping file (or the folder PATH); exit 1 naming file, table and field of each problem."""
    directory = path or environment.mappings_dir()
    if directory.is_file():
        raise click.ClickException(f"{directory}: give the mappings folder, not a file")
    try:
        loaded = load_mappings(directory)
    except MappingError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    tables = sum(len(c.tables) for c in loaded.clusters)
    enabled = sum(len(c.enabled_tables) for c in loaded.clusters)
    click.echo(f"{directory}: {len(loaded.clusters)} clusters, {tables} tables ({enabled} enabled): valid")


@mappings.command("deploy")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def mappings_deploy(path: Path | None) -> None:
    """Validate the mapping files (or the folder PATH) and, only if every one is valid, publish them to the running
    local platform: Dagster's code location is reloaded and the capture follows within seconds. A problem exits 1
    naming file, table and field, and changes nothing. (Production deploys through CI/CD, which validates first.)"""
    before = _deployed_tables()
    deployed, _ = _deploy_mappings(path)
    after = {t.source for _, t in deployed.tables()}
    added, removed = sorted(after - before), sorted(before - after)
    click.echo(
        f"deployed {len(deployed.clusters)} clusters, {len(after)} enabled tables to "
        f"{environment.deployed_mappings_dir()}"
        + (f"; added: {', '.join(added)}" if added else "")
        + (f"; removed: {', '.join(removed)}" if removed else "")
    )
    click.echo(_reload_dagster())


def _deployed_tables() -> set[str]:
    try:
        return {t.source for _, t in load_mappings(environment.deployed_mappings_dir()).tables()}
    except MappingError:
        return set()


def _deploy_mappings(path: Path | None = None) -> tuple[Mappings, bool]:
    """Validate the working mappings and publish them for the running platform: (mappings, whether they changed).
    Any problem exits 1 naming file, table and field; the running platform keeps what it has."""
    from cdc.mappings import deploy_mappings

    target = environment.deployed_mappings_dir()
    previous = target.resolve() if target.is_symlink() else None
    try:
        deployed = deploy_mappings(path or environment.mappings_dir(), target)
    except MappingError as exc:
        click.echo(f"{exc}\nNothing was deployed: the running platform keeps the mappings it has.", err=True)
        sys.exit(1)
    return deployed, target.resolve() != previous


def _platform_env() -> dict[str, str]:
    """The environment of the platform's background services: they read the deployed mappings."""
    return {**environment.resolved(), environment.MAPPINGS_DIR: str(environment.deployed_mappings_dir())}


def _reload_dagster() -> str:
    """Reload the running local Dagster's code location, whose definitions are built from the mappings."""
    url_file = environment.state_dir() / "dagster" / "url"
    if not _dagster_process().is_running() or not url_file.is_file():
        return "Dagster is not running: it loads the deployed mappings when it starts"
    from urllib.parse import urlparse

    from dagster_graphql import DagsterGraphQLClient, ReloadRepositoryLocationStatus

    url = urlparse(url_file.read_text().strip())
    info = DagsterGraphQLClient(str(url.hostname), port_number=url.port).reload_repository_location(
        DAGSTER_LOCATION
    )
    if info.status != ReloadRepositoryLocationStatus.SUCCESS:
        raise click.ClickException(f"Dagster could not load the deployed mappings: {info.message}")
    return f"Dagster code location {DAGSTER_LOCATION} reloaded"


DAGSTER_LOCATION = "mysql_bigquery_cdc"  # workspace.yaml


@mappings.command("schema")
@click.option("--write", is_flag=True, help="Write mapping.schema.json into the mappings folder.")
def mappings_schema(write: bool) -> None:
    """Print (or write) the JSON Schema editors use for mapping files, generated from the models."""
    from cdc.mappings import json_schema

    if write:
        click.echo(f"wrote {write_json_schema(environment.mappings_dir())}")
    else:
        click.echo(json.dumps(json_schema(), indent=2))


# -- local stack -----------------------------------------------------------------------------------------------


@main.group()
def stack() -> None:
    """The local platform: MariaDB per cluster, moto (S3+SQS), the BigQuery API server."""


def _local_stack() -> LocalStack:
    from local_stack.stack import LocalStack

    return LocalStack(_mappings())


@stack.command("up")
@click.option(
    "--free-ports", is_flag=True, help="Pick unused ports for every server (tests, parallel stacks)."
)
@click.option("--mariadb-base-port", type=int, help="First MariaDB port; clusters get consecutive ports.")
@click.option("--moto-port", type=int, help="moto server (S3 + SQS) port.")
@click.option("--bigquery-port", type=int, help="BigQuery API server REST port.")
@click.option("--bigquery-grpc-port", type=int, help="BigQuery API server gRPC port (Storage APIs).")
@click.option(
    "--max-receive-count", type=int, help="Receives before a message moves to the dead-letter queue."
)
@click.option("--visibility-timeout", "visibility_timeout_s", type=int, help="SQS visibility timeout (s).")
def stack_up(free_ports: bool, **ports: int | None) -> None:
    """Start every server (idempotent), wait until each answers, and show their health."""
    from local_stack.processes import StackError

    local = _local_stack()
    local.configure(free_ports=free_ports, **ports)
    try:
        statuses = local.up()
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_status(statuses)
    click.echo(f'state: {local.state_dir}  (configuration: `eval "$(cdc stack env)"`)')


@stack.command("down")
def stack_down() -> None:
    """Stop the background capture and every server of the local stack (data stays in the state folder)."""
    from capture.runner import background_process

    stopped = ["dagster"] if _dagster_process().stop(timeout=60) else []
    stopped += ["capture"] if background_process().stop(timeout=60) else []
    stopped += _local_stack().down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack.command("status")
def stack_status() -> None:
    """Each service's health; exit 1 if any is not healthy."""
    statuses = _local_stack().status()
    _print_status(statuses)
    if not all(status.healthy for status in statuses):
        sys.exit(1)


@stack.command("env")
@click.option("--redact", is_flag=True, help="Show secrets as *** (for display, not for eval).")
def stack_env(redact: bool) -> None:
    """`export` lines with every endpoint and name the platform reads (eval them in your shell)."""
    values = environment.local_stack_values()
    if not values:
        raise click.ClickException("the local stack has not been brought up yet: run `cdc stack up`")
    for key in sorted(values):
        secret = redact and key.endswith(("PASSWORD", "SECRET_ACCESS_KEY"))
        click.echo(f"export {key}={'***' if secret else shlex.quote(values[key])}")


def _print_status(statuses: list[ServiceStatus]) -> None:
    width = max(len(s.name) for s in statuses)
    for status in statuses:
        click.echo(f"{status.name:<{width}}  127.0.0.1:{status.port:<5}  {status.health}")


# -- capture -----------------------------------------------------------------------------------------------------


@main.group()
def capture() -> None:
    """The binlog capture: DMS-compatible Parquet files in S3 (for clusters without AWS DMS, and locally)."""


@capture.command("run")
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable); default all.")
@click.option(
    "--flush-interval",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds between flushes (DMS: up to 60).",
)
@click.option(
    "--flush-rows",
    type=int,
    default=50_000,
    show_default=True,
    help="Flush once this many rows are buffered.",
)
@click.option(
    "--date-folders/--no-date-folders",
    default=True,
    show_default=True,
    help="DMS DatePartitionEnabled layout.",
)
def capture_run(
    clusters: tuple[str, ...], flush_interval: float, flush_rows: int, date_folders: bool
) -> None:
    """Full load, then stream each cluster's binlog until SIGTERM (one process per cluster, restarted if it
    crashes; with one --cluster, in this process)."""
    from capture.runner import CAPTURE_STOPPED, cdc_command, run_cluster, run_clusters
    from capture.service import CaptureError, CaptureSettings

    loaded = _mappings()
    try:
        chosen = [loaded.cluster(name) for name in clusters] if clusters else list(loaded.clusters)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    settings = CaptureSettings(
        flush_interval_s=flush_interval, flush_rows=flush_rows, date_folders=date_folders
    )
    if clusters and len(chosen) == 1:  # one named cluster: run here; otherwise supervise one process each
        try:
            run_cluster(chosen[0], loaded, settings)
        except CaptureError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(CAPTURE_STOPPED)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
        return
    options = ["--flush-interval", str(flush_interval), "--flush-rows", str(flush_rows)]
    options.append("--date-folders" if date_folders else "--no-date-folders")
    sys.exit(
        run_clusters([[cdc_command(), "capture", "run", "--cluster", c.cluster, *options] for c in chosen])
    )


@capture.command("start")
@click.option("--flush-interval", type=float, default=2.0, show_default=True)
def capture_start(flush_interval: float) -> None:
    """Run `cdc capture run` for every cluster in the background (log under the state folder)."""
    from capture.runner import background_process, cdc_command

    process = background_process()
    if process.is_running():
        click.echo(f"capture already running (pid {process.pid()}); log: {process.log_file}")
        return
    _, changed = _deploy_mappings()
    if changed and _dagster_process().is_running():
        click.echo(_reload_dagster())
    argv = [cdc_command(), "capture", "run", "--flush-interval", str(flush_interval)]
    process.start(argv, ready=lambda: True, env=_platform_env())
    click.echo(f"capture started (pid {process.pid()}); log: {process.log_file}")


@capture.command("stop")
def capture_stop() -> None:
    """Stop the background capture gracefully (it flushes and checkpoints first)."""
    from capture.runner import background_process

    click.echo("capture stopped" if background_process().stop(timeout=60) else "capture was not running")


@capture.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status documents as JSON.")
def capture_status(as_json: bool) -> None:
    """Each cluster's capture: state, lag, rows/s, rows by op, last checkpoint, errors."""
    from capture.runner import capture_status as read_status

    statuses = read_status(_mappings())
    if as_json:
        click.echo(json.dumps(statuses, indent=2))
        return
    for status in statuses:
        rows = status.get("rows", {})
        checkpoint = status.get("checkpoint", {})
        click.echo(
            f"{status['cluster']:<20} {status.get('state', '?'):<12} lag {status.get('lag_seconds', '-')} s  "
            f"{status.get('rows_per_second', 0)} rows/s  load {rows.get('load', 0)} I {rows.get('I', 0)} "
            f"U {rows.get('U', 0)} D {rows.get('D', 0)}  zero dates {status.get('zero_dates', 0)}  "
            f"checkpoint {checkpoint.get('gtid', '-')} ({checkpoint.get('commit_time', '-')})"
        )
        for error in status.get("errors", []):
            click.echo(f"    error: {error}")


@capture.command("reset")
@click.option("--cluster", required=True, help="The cluster whose checkpoint to forget.")
def capture_reset(cluster: str) -> None:
    """Forget a cluster's checkpoint: its next run starts with a new full load (re-snapshot)."""
    from capture.runner import s3_store

    _mappings().cluster(cluster)
    s3_store().delete_json("checkpoints", cluster)
    click.echo(f"{cluster}: checkpoint removed; the next `cdc capture run` makes a new full load")


# -- Dagster ---------------------------------------------------------------------------------------------------


@main.group()
def dagster() -> None:
    """The local Dagster instance (webserver + daemon) running the pipeline's definitions."""


def _dagster_process() -> Any:
    from local_stack.processes import background_service

    return background_service("dagster")


@dagster.command("start")
@click.option("--port", type=int, default=3000, show_default=True, help="Dagster UI port.")
def dagster_start(port: int) -> None:
    """Start `dagster dev` in the background with DAGSTER_HOME under the state folder; print the UI URL."""
    import shutil
    import urllib.request

    process = _dagster_process()
    url = f"http://127.0.0.1:{port}"
    if process.is_running():
        click.echo(f"dagster already running (pid {process.pid()}): {url}")
        return
    _deploy_mappings()
    home = environment.state_dir() / "dagster" / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home.parent / "url").write_text(url + "\n")
    instance_yaml = environment.resolved().get(
        environment.DAGSTER_INSTANCE_YAML, str(environment.PROJECT_ROOT / "deploy" / "local" / "dagster.yaml")
    )
    shutil.copy(instance_yaml, home / "dagster.yaml")
    _fail_orphaned_runs(home)
    dagster_cli = str(Path(sys.executable).with_name("dagster"))
    argv = [
        dagster_cli,
        "dev",
        "-w",
        str(environment.PROJECT_ROOT / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/server_info", timeout=1) as response:
            return bool(response.status == 200)

    process.start(
        argv,
        ready=ready,
        env={**_platform_env(), "DAGSTER_HOME": str(home)},
        timeout=120,
        extra_ports=(port,),
    )
    click.echo(f"dagster started (pid {process.pid()}): {url}  log: {process.log_file}")


@dagster.command("stop")
def dagster_stop() -> None:
    """Stop the background Dagster instance."""
    click.echo("dagster stopped" if _dagster_process().stop(timeout=60) else "dagster was not running")


def _processes_of_instance(home: Path) -> list[int]:
    """The processes still running with DAGSTER_HOME=home: what is left of an earlier Dagster of this instance
    (its run workers are spawned by the code server and inherit its environment)."""
    import os

    wanted = f"DAGSTER_HOME={home}".encode()
    ours = os.getsid(
        0
    )  # this command and whoever started it (the earlier Dagster ran in a session of its own)
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            pid = int(environ.parent.name)
            if wanted in environ.read_bytes().split(b"\0") and os.getsid(pid) != ours:
                found.append(pid)
        except OSError:
            continue  # ended while we looked, or not ours to read
    return found


def _fail_orphaned_runs(home: Path) -> None:
    """Mark failed the runs a stopped or killed Dagster left STARTING/STARTED, when no process of it is left.

    Locally a run's worker is a child of `dagster dev`, so it dies with it, and the default run launcher has no
    worker health check: such a run would stay "started" forever, holding its pool slots and making the SQS
    sensor wait for it. Failed, it is alerted on, its slots are freed by run monitoring, and its files (never
    acknowledged in SQS) load in the next run."""
    import dagster as dg

    leftovers = _processes_of_instance(home)
    if leftovers:  # a worker of the earlier Dagster may still be running its run: leave the runs to it
        click.echo(
            f"processes of an earlier Dagster still run ({len(leftovers)}); its runs in progress are left alone"
        )
        return
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        records = instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])
        )
        for record in records:
            run = record.dagster_run
            instance.report_run_failed(
                run,
                "its run worker is gone: Dagster was stopped or killed while the run was in progress (found by "
                "`cdc dagster start`); files it did not load were never acknowledged in SQS and load in a later run",
            )
            click.echo(f"run {run.run_id} left in progress by the previous Dagster: marked failed")
    finally:
        instance.dispose()


def _dagster_instance() -> Any:
    """The Dagster instance of DAGSTER_HOME (locally: the one `cdc dagster start` runs), or None if there is none."""
    import os

    import dagster as dg

    home = os.environ.get("DAGSTER_HOME") or str(environment.state_dir() / "dagster" / "home")
    return dg.DagsterInstance.from_config(home) if Path(home, "dagster.yaml").is_file() else None


def _check_marks(checks: dict[str, dict[str, Any]]) -> str:
    short = {
        "no_duplicate_changes": "dup",
        "row_count_matches_source": "rows",
        "landed_files_loaded": "files",
    }
    marks = []
    for name, label in short.items():
        result = checks.get(name)
        if not result:
            mark = "-"
        elif "passed" not in result:
            mark = "running" if result.get("status") == "planned" else result.get("status", "?")
        else:
            mark = "ok" if result["passed"] else "FAIL"
        marks.append(f"{label}:{mark}")
    return " ".join(marks)


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--table", default=None, help="Only this table (its target or source name).")
def status(as_json: bool, table: str | None) -> None:
    """Per mapped table: cluster, last source commit loaded, lag, rows changed today by op, last check results,
    files waiting to load and dead-letter messages."""
    from cdc.clients import bigquery_client
    from cdc_assets import status as table_status
    from cdc_assets.resources import LandingResource

    values = environment.resolved()
    landing = LandingResource(
        bucket=environment.require(environment.LANDING_BUCKET),
        prefix=values.get(environment.LANDING_PREFIX, environment.DEFAULT_LANDING_PREFIX),
        queue_url=values.get(environment.SQS_QUEUE_URL, ""),
        dead_letter_queue_url=values.get(environment.SQS_DLQ_URL, ""),
    )
    bq = bigquery_client(
        environment.require(environment.BIGQUERY_PROJECT), values.get(environment.BIGQUERY_ENDPOINT) or None
    )
    mappings = _mappings()
    if table and not any(table in (t.target, t.source) for _, t in mappings.tables()):
        raise click.ClickException(f"no mapped table is named {table!r} (use its target or source name)")
    statuses, unmapped = table_status.collect(mappings, landing, bq, _dagster_instance(), only=table)
    if as_json:
        report = {"tables": [s.to_json() for s in statuses], "dead_letters_unmapped": unmapped}
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{'table':<32} {'cluster':<18} {'last commit loaded (UTC)':<27} {'lag':>9} {'today I/U/D':>15} "
        f"{'waiting':>7} {'dead':>5}  checks"
    )
    for s in statuses:
        last = (s.last_commit_loaded or "-")[:26].replace("T", " ")
        lag = f"{s.lag_s:.1f} s" if s.lag_s is not None else "-"
        today = "/".join(str(s.rows_today.get(op, 0)) for op in "IUD")
        click.echo(
            f"{s.target:<32} {s.cluster:<18} {last:<27} {lag:>9} {today:>15} {s.files_waiting:>7} "
            f"{s.dead_letters:>5}  {_check_marks(s.checks)}"
        )
    if unmapped:
        click.echo(
            f"{unmapped} dead-letter message(s) name no mapped table (cdc stack status shows the queue)"
        )


@main.command("resnapshot")
@click.argument("table", required=False)
@click.option(
    "--cluster", default=None, help="Every table of this cluster that has a primary key, one by one."
)
def resnapshot(table: str | None, cluster: str | None) -> None:
    """Re-snapshot TABLE (its BigQuery target or source name), or every table of --cluster, from the source: the
    resnapshot_table job, run here.

    The runs are recorded in the Dagster instance of DAGSTER_HOME (locally: the one `cdc dagster start` runs)."""
    from cdc_assets.definitions import build_definitions
    from cdc_assets.resnapshot import RESNAPSHOT_JOB
    from sensors.alerts import error_text

    if (table is None) == (cluster is None):
        raise click.UsageError("name a TABLE or a --cluster (not both)")
    if cluster is not None:
        try:
            tables = [t.target for t in _mappings().cluster(cluster).enabled_tables if t.primary_key]
        except KeyError as exc:
            raise click.ClickException(str(exc.args[0])) from exc
    else:
        tables = [str(table)]
    instance = _dagster_instance()
    job = build_definitions().resolve_job_def(RESNAPSHOT_JOB)
    for name in tables:
        result = job.execute_in_process(
            run_config={"ops": {"resnapshot_from_source": {"config": {"table": name}}}},
            instance=instance,
            raise_on_error=False,
        )
        failure = result.failure_data_for_node("resnapshot_from_source")
        if not result.success:
            reason = failure.error if failure else None
            raise click.ClickException(
                f"re-snapshot of {name} failed: {error_text(reason) or 'see the run log'}"
            )
        [materialization] = result.asset_materializations_for_node("resnapshot_from_source")
        values = {key: entry.value for key, entry in materialization.metadata.items()}
        click.echo(
            f"{name}: re-snapshot loaded {values['rows']} row(s) from {values['files']} file(s) at binlog "
            f"{values['snapshot_position']} (run {result.run_id})"
        )


@main.group()
def bigquery() -> None:
    """Look at what has arrived in BigQuery."""


@bigquery.command("ls")
@click.option("--wait", type=float, default=0.0, help="Wait up to this many seconds for the first table.")
def bigquery_ls(wait: float) -> None:
    """Every mapped table's current-state and changelog row counts (tables not created yet are skipped)."""
    import time

    from google.api_core import exceptions

    from cdc.clients import bigquery_client
    from cdc.mappings import quote_bigquery

    values = environment.resolved()
    client = bigquery_client(
        environment.require(environment.BIGQUERY_PROJECT), values.get(environment.BIGQUERY_ENDPOINT) or None
    )
    deadline = time.monotonic() + wait
    while True:
        rows = []
        for _, table in _mappings().tables():
            for name in (
                (table.target_table, table.changelog_table) if table.primary_key else (table.target_table,)
            ):
                try:
                    ref = quote_bigquery(client.project, table.target_dataset, name)
                    count = next(iter(client.query(f"SELECT COUNT(*) AS n FROM {ref}").result())).n  # noqa: S608
                except exceptions.NotFound:
                    continue
                rows.append((f"{table.target_dataset}.{name}", count))
        if rows or time.monotonic() >= deadline:
            break
        time.sleep(2)
    for name, count in rows:
        click.echo(f"{name:<45} {count:>8} rows")
    click.echo(f"{len(rows)} BigQuery table(s)")


# -- AWS DMS -----------------------------------------------------------------------------------------------------


@main.group()
def dms() -> None:
    """AWS DMS tasks rendered from the same mapping files (one deploy for DMS and the pipeline)."""


@dms.command("render")
def dms_render() -> None:
    """Print the DMS S3 target settings and, per cluster, the task with its table-mapping rules (JSON)."""
    from capture.dms import render

    click.echo(json.dumps(render(_mappings()), indent=2))


@dms.command("apply")
def dms_apply() -> None:
    """Create or replace the DMS endpoints and tasks so they match the mappings."""
    from botocore.exceptions import BotoCoreError, ClientError

    from capture.dms import DmsApplier
    from cdc.clients import aws_client

    try:
        actions = DmsApplier(aws_client("dms"), _mappings()).apply()
    except (ClientError, BotoCoreError, RuntimeError) as exc:
        raise click.ClickException(f"DMS apply failed: {exc}") from exc
    for action in actions:
        click.echo(action)


# -- demo workload ---------------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--rate", type=float, default=100.0, show_default=True, help="Changed rows per second, in total."
)
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds to run.")
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable); default all.")
@click.option("--seed", type=int, default=None, help="Random seed for a repeatable workload.")
def workload(rate: float, duration: float, clusters: tuple[str, ...], seed: int | None) -> None:
    """Create the demo schemas if needed and drive inserts, updates and deletes across the local clusters."""
    from local_stack.demo_schema import demo_clusters
    from local_stack.workload import Workload

    local = _local_stack()
    chosen = [c for c in demo_clusters() if not clusters or c.name in clusters]
    unknown = set(clusters) - {c.name for c in chosen}
    if unknown:
        raise click.ClickException(f"unknown cluster(s): {', '.join(sorted(unknown))}")

    def connect(cluster: object) -> object:
        name = cluster.name  # type: ignore[attr-defined]
        user, password = local.admin_credentials(name)
        return local.mariadb(name).connect(user, password)

    try:
        driver = Workload(connect, chosen, seed=seed)  # type: ignore[arg-type]
    except Exception as exc:
        raise click.ClickException(
            f"cannot connect to the local MariaDB servers ({exc}); run `cdc stack up`"
        ) from exc
    try:
        driver.ensure_schemas()
        report = driver.run(rate=rate, duration=duration)
    finally:
        driver.close()
    ops = ", ".join(f"{op} {n}" for op, n in sorted(report.changes.items()))
    click.echo(
        f"workload: {report.total} changes in {report.seconds:.1f} s ({report.total / max(report.seconds, 1e-9):.0f}/s) "
        f"across {len(report.per_cluster)} clusters: {ops}"
    )
