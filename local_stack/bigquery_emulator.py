"""Launcher of the local BigQuery API server: bqemulator 1.4.0 made to start offline and behave like BigQuery.

Stock bqemulator 1.4.0 deviates from real BigQuery in ways that would hide exactly the bugs this platform must
not have (docs/local-stack.md). This launcher replaces a handful of its internal functions at start-up, then
runs its normal `start` command. Each patch restores one documented BigQuery behaviour:

- offline start: DuckDB's spatial extension is loaded from the `duckdb-extension-spatial` wheel (no download);
- sized for a laptop: DuckDB's memory limit is `CDC_STACK_BIGQUERY_MEMORY` (default 512MB; DuckDB's own default
  is 80 % of the machine's memory, which its buffer pool filled with cached table pages), spilling to disk beyond;
- job ids: inserting a job whose id exists answers 409 Conflict (reason "duplicate") for every job kind, and
  an uploaded load (`load_table_from_file`) keeps the job id the client chose, so `get_job` finds it;
- Parquet loads match columns by NAME; a missing table is created from the Parquet schema (autodetect);
  `schemaUpdateOptions: ALLOW_FIELD_ADDITION` adds new columns (otherwise an extra column is an error);
- partition decorators: a load into `table$YYYYMMDD` replaces (WRITE_TRUNCATE) or appends to that one day and
  rejects rows of other days;
- loads are atomic: a failed load (WRITE_TRUNCATE included) leaves the table exactly as it was;
- no per-write copy of the whole table for time travel (it made memory grow with every load);
- the Storage Write API with BigQuery's native CDC, primary keys and max_staleness (`local_stack/bigquery_cdc.py`).

The patches target bqemulator==1.4.0 exactly (pinned in pyproject); `tests/test_bigquery_conformance.py`
asserts each behaviour against BigQuery's documentation, so an upgrade that breaks one fails the tests.
Run `python -m local_stack.bigquery_emulator start --stock ...` to get the unpatched server (offline start only).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local_stack import bigquery_cdc
from local_stack.processes import ServerProcess

SUPPORTED_VERSION = "1.4.0"
_DECORATOR = re.compile(r"^(?P<table>[^$]+)\$(?P<day>\d{8})$")


def patch_offline_spatial() -> None:
    """Load DuckDB's spatial extension from the PyPI wheel instead of downloading it at every start."""
    import duckdb
    import duckdb_extension_spatial  # type: ignore[import-untyped]
    from bqemulator.storage.engine import DuckDBEngine

    package_dir = Path(next(iter(duckdb_extension_spatial.__path__)))
    extension = package_dir / "extensions" / f"v{duckdb.__version__}" / "spatial.duckdb_extension"

    def _load_spatial(self: Any) -> None:
        if not extension.is_file():
            raise RuntimeError(
                f"DuckDB spatial extension for duckdb {duckdb.__version__} not found at {extension}; "
                "install duckdb-extension-spatial with the same version as duckdb."
            )
        self._connection.execute(f"LOAD '{extension}'")

    DuckDBEngine._load_spatial = _load_spatial  # type: ignore[method-assign]


MEMORY_ENV = "CDC_STACK_BIGQUERY_MEMORY"
DEFAULT_MEMORY = "512MB"


def patch_memory_limit() -> None:
    """Bound DuckDB's memory (its buffer pool, hash tables, sorts) to `CDC_STACK_BIGQUERY_MEMORY`; beyond it
    DuckDB evicts cached pages and spills work to its temporary folder beside the database file."""
    from bqemulator.storage.engine import DuckDBEngine

    stock_pragmas = DuckDBEngine._apply_session_pragmas

    def _apply_session_pragmas(self: Any) -> None:
        stock_pragmas(self)
        limit = os.environ.get(MEMORY_ENV, DEFAULT_MEMORY)
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", limit, re.IGNORECASE):
            raise SystemExit(f"{MEMORY_ENV}={limit!r}: give a size such as 512MB or 2GB")
        self._connection.execute(f"SET memory_limit = '{limit}'")

    DuckDBEngine._apply_session_pragmas = _apply_session_pragmas  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------------------
# Job ids: 409 on duplicates, uploaded loads keep their id
# --------------------------------------------------------------------------------------------------------------

_jobs_in_flight: set[tuple[str, str]] = set()


def _claim_job_id(ctx: Any, project_id: str, job_id: str) -> None:
    """Raise BigQuery's 409 duplicate if the id is taken; otherwise reserve it until the job is stored."""
    from bqemulator.domain.errors import AlreadyExistsError

    key = (project_id, job_id)
    if key in _jobs_in_flight or ctx.catalog.get_job(project_id, job_id) is not None:
        raise AlreadyExistsError(f"Already Exists: Job {project_id}:US.{job_id}")
    _jobs_in_flight.add(key)


def _with_unique_job_id(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapper(project_id: str, job_id: str, *args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx") or next(a for a in args if hasattr(a, "catalog"))
        _claim_job_id(ctx, project_id, job_id)
        try:
            return await handler(project_id, job_id, *args, **kwargs)
        finally:
            _jobs_in_flight.discard((project_id, job_id))

    return wrapper


def patch_job_ids() -> None:
    from bqemulator.api.routes import jobs, upload

    for name in (
        "_handle_query_job",
        "_handle_load_job_with_async_envelope",
        "execute_extract_job",
        "execute_copy_job",
    ):
        setattr(jobs, name, _with_unique_job_id(getattr(jobs, name)))

    original_from_envelope = upload._load_configuration_from_envelope

    def _load_configuration_from_envelope(envelope: dict[str, Any]) -> dict[str, Any]:
        configuration = dict(original_from_envelope(envelope))
        job_id = (envelope.get("jobReference") or {}).get("jobId")
        if job_id:
            configuration["__job_id"] = job_id  # carried through the upload session to _run_load
        return configuration

    async def _run_load(*, project_id: str, configuration: dict[str, Any], media_path: str, ctx: Any) -> Any:
        from bqemulator.catalog.etag import generate_etag
        from bqemulator.catalog.models import JobMeta
        from bqemulator.domain.errors import InvalidQueryError, UnsupportedFeatureError, ValidationError

        configuration = dict(configuration)
        job_id = configuration.pop("__job_id", None) or upload._new_job_id()
        load_block = {**configuration.get("load", {}), "sourceUris": [f"file://{media_path}"]}
        merged = {**configuration, "load": load_block}
        _claim_job_id(ctx, project_id, job_id)
        try:
            try:
                job_meta = await execute_load_job(project_id, job_id, merged, ctx)
            except (UnsupportedFeatureError, InvalidQueryError, ValidationError):
                raise
            except Exception as exc:
                now = ctx.clock.now()
                job_meta = JobMeta(
                    project_id=project_id,
                    job_id=job_id,
                    job_type="LOAD",
                    state="DONE",
                    configuration=merged,
                    statistics={"load": {"inputFiles": "1"}},
                    error_result={
                        "reason": "invalid",
                        "message": f"Error while reading data, error message: {exc}",
                    },
                    creation_time=now,
                    start_time=now,
                    end_time=now,
                    etag=generate_etag(project_id, job_id, str(now)),
                )
            ctx.catalog.upsert_job(job_meta)
        finally:
            _jobs_in_flight.discard((project_id, job_id))
        return job_id, job_meta

    upload._load_configuration_from_envelope = _load_configuration_from_envelope
    upload._run_load = _run_load


# --------------------------------------------------------------------------------------------------------------
# Loads: Parquet by name, autodetect, field addition, partition decorators, atomicity
# --------------------------------------------------------------------------------------------------------------


def _split_decorator(table_id: str) -> tuple[str, dt.date | None]:
    match = _DECORATOR.match(table_id)
    if not match:
        return table_id, None
    try:
        day = dt.datetime.strptime(match["day"], "%Y%m%d").date()
    except ValueError as exc:
        from bqemulator.domain.errors import InvalidQueryError

        raise InvalidQueryError(f"Invalid partition decorator in table id {table_id!r}") from exc
    return match["table"], day


def _parquet_schema_entries(paths: list[str]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq
    from bqemulator.jobs.executor import _arrow_field_to_schema_entry

    schema = pq.read_schema(paths[0])
    entries = [_arrow_field_to_schema_entry(field) for field in schema]
    for entry in entries:
        entry["mode"] = "NULLABLE" if entry.get("mode", "NULLABLE") != "REPEATED" else "REPEATED"
    return entries


async def execute_load_job(project_id: str, job_id: str, config: dict[str, Any], ctx: Any) -> Any:
    """BigQuery's load semantics on top of the emulator's helpers (replaces executor.execute_load_job)."""
    from bqemulator.api.routes.tables import _parse_schema_fields
    from bqemulator.catalog.etag import generate_etag
    from bqemulator.catalog.models import (
        Clustering,
        JobMeta,
        TableMeta,
        TableSchema,
        TimePartitioning,
    )
    from bqemulator.domain.errors import InvalidQueryError, ResourceRef, resource_not_found
    from bqemulator.jobs import executor
    from bqemulator.storage.sql_identifiers import quoted_table_ref
    from bqemulator.storage.type_map import bq_schema_to_duckdb_columns

    now = ctx.clock.now()
    load = dict(config.get("load", {}))
    destination = dict(load.get("destinationTable", {}))
    dest_project = destination.get("projectId", project_id)
    dataset_id = destination.get("datasetId", "")
    table_id, partition_day = _split_decorator(destination.get("tableId", ""))
    source_format = str(load.get("sourceFormat", "CSV")).upper()
    write_disposition = load.get("writeDisposition", "WRITE_APPEND")
    create_disposition = load.get("createDisposition", "CREATE_IF_NEEDED")
    allow_field_addition = "ALLOW_FIELD_ADDITION" in (load.get("schemaUpdateOptions") or [])
    paths = [executor._resolve_uri(uri, ctx) for uri in load.get("sourceUris", [])]
    for path in paths:
        executor._validate_local_path(path)
    if ctx.catalog.get_dataset(dest_project, dataset_id) is None:
        raise resource_not_found(ResourceRef("dataset", dest_project, dataset_id))
    target = quoted_table_ref(dest_project, dataset_id, table_id)

    table = ctx.catalog.get_table(dest_project, dataset_id, table_id)
    created: TableMeta | None = None
    new_fields: list[dict[str, Any]] = []
    is_parquet = source_format == "PARQUET"
    file_fields = _parquet_schema_entries(paths) if is_parquet and paths else []

    async with ctx.engine.write_lock():
        ctx.engine.execute("BEGIN TRANSACTION")
        try:
            if table is None:
                if create_disposition != "CREATE_IF_NEEDED":
                    raise resource_not_found(ResourceRef("table", dest_project, dataset_id, table_id))
                fields_raw = (load.get("schema") or {}).get("fields") or file_fields
                if not fields_raw:
                    # CSV/JSON autodetect and the rest: the emulator's own creation path.
                    executor._maybe_create_load_destination(
                        dest_project=dest_project,
                        dest_dataset=dataset_id,
                        dest_table_id=table_id,
                        load_config={**load, "sourceUris": load.get("sourceUris", [])},
                        now=now,
                        ctx=ctx,
                    )
                    table = ctx.catalog.get_table(dest_project, dataset_id, table_id)
                    if table is None:
                        raise InvalidQueryError(
                            f"Not found: Table {dest_project}:{dataset_id}.{table_id} (no schema to create it from)"
                        )
                else:
                    schema = executor._build_explicit_schema(ctx, target, fields_raw)
                    partitioning = load.get("timePartitioning")
                    clustering = load.get("clustering")
                    created = TableMeta(
                        project_id=dest_project,
                        dataset_id=dataset_id,
                        table_id=table_id,
                        table_type="TABLE",
                        schema=schema,
                        time_partitioning=TimePartitioning(
                            type=partitioning.get("type", "DAY"), field=partitioning.get("field")
                        )
                        if partitioning
                        else None,
                        clustering=Clustering(fields=tuple(clustering["fields"])) if clustering else None,
                        creation_time=now,
                        last_modified_time=now,
                        etag=generate_etag(dest_project, dataset_id, table_id, "TABLE", str(now)),
                    )
                    table = created

            table_columns = {field.name.lower() for field in table.schema_.fields}
            if is_parquet:
                extra = [entry for entry in file_fields if entry["name"].lower() not in table_columns]
                if extra and not allow_field_addition:
                    raise InvalidQueryError(
                        "Provided Schema does not match Table "
                        f"{dest_project}:{dataset_id}.{table_id}. Cannot add fields (field: {extra[0]['name']})"
                    )
                for entry in extra:
                    [(name, duck_type)] = bq_schema_to_duckdb_columns([entry])
                    ctx.engine.execute(f'ALTER TABLE {target} ADD COLUMN "{name}" {duck_type}')
                new_fields = extra

            partition_filter = ""
            if partition_day is not None:
                field = table.time_partitioning.field if table.time_partitioning else None
                if field is None:
                    raise InvalidQueryError(
                        f"Partition decorator on {dataset_id}.{table_id} requires a table partitioned by DAY on a "
                        "column (ingestion-time partitioning is not emulated)"
                    )
                partition_filter = f"CAST(\"{field}\" AS DATE) = DATE '{partition_day.isoformat()}'"

            if write_disposition == "WRITE_TRUNCATE":
                ctx.engine.execute(
                    f"DELETE FROM {target}" + (f" WHERE {partition_filter}" if partition_filter else "")
                )
            elif write_disposition == "WRITE_EMPTY":
                count = ctx.engine.execute(f"SELECT COUNT(*) FROM {target}").fetchone()
                if count and count[0] > 0:
                    raise InvalidQueryError(
                        f"Table {dataset_id}.{table_id} is not empty and writeDisposition is WRITE_EMPTY"
                    )

            outside_sql = f"SELECT COUNT(*) FROM {target} WHERE NOT coalesce({partition_filter}, false)"
            outside_before = ctx.engine.execute(outside_sql).fetchone()[0] if partition_filter else 0
            before = ctx.engine.execute(f"SELECT COUNT(*) FROM {target}").fetchone()[0]
            for path in paths:
                if is_parquet:
                    ctx.engine.execute(
                        f"INSERT INTO {target} BY NAME SELECT * FROM read_parquet(?)",
                        [_wide_decimals_as_text(path)],
                    )
                else:
                    executor._load_path_into_target(
                        path,
                        executor._parse_load_job_config(
                            project_id,
                            {"load": {**load, "destinationTable": {**destination, "tableId": table_id}}},
                        ),
                        ctx,
                    )
            total = ctx.engine.execute(f"SELECT COUNT(*) FROM {target}").fetchone()[0]
            if partition_filter and ctx.engine.execute(outside_sql).fetchone()[0] != outside_before:
                raise InvalidQueryError(
                    "Some rows belong to different partitions rather than destination partition "
                    f"{destination.get('tableId', '').rsplit('$', 1)[-1]}"
                )
            ctx.engine.execute("COMMIT")
        except BaseException:
            ctx.engine.execute("ROLLBACK")
            raise

    # Only a committed load changes the catalog.
    if created is not None:
        ctx.catalog.create_table(created)
    table_meta = ctx.catalog.get_table(dest_project, dataset_id, table_id)
    if table_meta is not None:
        update: dict[str, Any] = {"num_rows": total, "last_modified_time": ctx.clock.now()}
        if new_fields:
            fields = tuple(table_meta.schema_.fields) + tuple(_parse_schema_fields(new_fields))
            update["schema_"] = TableSchema(fields=fields)
        ctx.catalog.update_table(table_meta.model_copy(update=update))
        ctx.snapshots.record_change(dest_project, dataset_id, table_id)

    return JobMeta(
        project_id=project_id,
        job_id=job_id,
        job_type="LOAD",
        state="DONE",
        configuration=config,
        statistics={"load": {"outputRows": str(total - before), "inputFiles": str(len(paths))}},
        creation_time=now,
        start_time=now,
        end_time=ctx.clock.now(),
        etag=generate_etag(project_id, job_id, str(now)),
    )


def _wide_decimals_as_text(path: str) -> str:
    """The Parquet file to insert: decimals wider than DuckDB's 38 digits (BIGNUMERIC) as exact plain text, which
    is how the patched server stores BIGNUMERIC (DuckDB would read them as DOUBLE)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    wide = [i for i, f in enumerate(schema) if pa.types.is_decimal(f.type) and f.type.precision > 38]
    if not wide:
        return path
    table = pq.read_table(path)
    for index in wide:
        text = [None if v is None else format(v, "f") for v in table.column(index).to_pylist()]
        table = table.set_column(index, schema.field(index).name, pa.array(text, pa.string()))
    converted = f"{path}.bignumeric.parquet"
    pq.write_table(table, converted)
    return converted


def patch_bignumeric() -> None:
    """BIGNUMERIC holds 76 digits; DuckDB's widest DECIMAL holds 38, so the stock server cannot create or load such
    a column (`DECIMAL type width must be between 1 and 38`). Stored as exact decimal text instead: loads convert
    wide Parquet decimals to that text (`_wide_decimals_as_text`); Write API appends take the table's Arrow schema,
    in which BIGNUMERIC is that text too (proto rows carry it as text already). Queries see the column as a STRING of the exact value (arithmetic on it is not emulated)."""
    import pyarrow as pa
    from bqemulator.api.routes import tabledata
    from bqemulator.storage import type_map

    type_map._BQ_TO_DUCKDB["BIGNUMERIC"] = "VARCHAR"
    to_arrow = tabledata._bq_type_to_arrow  # the Arrow schema of a table (Write API appends, row listing)

    def bq_type_to_arrow(bq_type: str) -> Any:
        return pa.string() if bq_type.upper() == "BIGNUMERIC" else to_arrow(bq_type)

    tabledata._bq_type_to_arrow = bq_type_to_arrow


def patch_loads() -> None:
    from bqemulator.api.routes import jobs, upload
    from bqemulator.jobs import executor

    for module in (executor, jobs, upload):
        module.execute_load_job = execute_load_job  # type: ignore[attr-defined]


def patch_no_table_copies() -> None:
    """Publish the change event every write path relies on, without copying the whole table each time."""
    from bqemulator.domain.events import TableDataChanged
    from bqemulator.versioning.snapshots import SnapshotManager

    def record_change(self: Any, project_id: str, dataset_id: str, table_id: str) -> None:
        self._events.publish(TableDataChanged(project_id, dataset_id, table_id))

    SnapshotManager.record_change = record_change  # type: ignore[method-assign]


TABLE_ROUTE = "/projects/{project_id}/datasets/{dataset_id}/tables/{table_id}"


def _adding_columns(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap tables.patch/update: fields the new schema adds are added to the stored table as well."""
    from bqemulator.api.routes import tables
    from bqemulator.storage.type_map import bq_schema_to_duckdb_columns

    @functools.wraps(handler)
    async def wrapper(**kwargs: Any) -> Any:
        ctx, ids = kwargs["ctx"], (kwargs["project_id"], kwargs["dataset_id"], kwargs["table_id"])
        before = ctx.catalog.get_table(*ids)
        result = await handler(**kwargs)
        if before is not None and before.table_type == "TABLE":
            have = {field.name.lower() for field in before.schema_.fields}
            added = [f for f in result.get("schema", {}).get("fields", []) if f["name"].lower() not in have]
            async with ctx.engine.write_lock():
                for entry in added:
                    [(name, duck_type)] = bq_schema_to_duckdb_columns([entry])
                    ctx.engine.execute(
                        f'ALTER TABLE {tables.quoted_table_ref(*ids)} ADD COLUMN "{name}" {duck_type}'
                    )
        return result

    return wrapper


HANDLER_THREADS = 64


def patch_handler_threads() -> None:
    """Stock runs the Write API's handlers (synchronous) and the REST side's blocking calls on asyncio's default
    executor: min(32, cores + 4) threads, 6 on a 2-core machine. An AppendRows call holds its thread from its first
    request to its end, so six appends at once took every thread and the rest - other appends, REST writes waiting
    for the write lock, queries - queued behind them while the server idled. The gRPC handlers get a pool of
    HANDLER_THREADS, and the event loop a default executor as large."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from bqemulator.grpc_api import server as grpc_server

    build = grpc_server.build_grpc_server

    def build_grpc_server(context: Any) -> Any:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=HANDLER_THREADS, thread_name_prefix="rest-blocking")
        )
        original = grpc.aio.server

        def server(*args: Any, **kwargs: Any) -> Any:
            pool = ThreadPoolExecutor(max_workers=HANDLER_THREADS, thread_name_prefix="grpc-handler")
            return original(*args, **{**kwargs, "migration_thread_pool": pool})

        grpc.aio.server = server  # type: ignore[assignment]
        try:
            return build(context)
        finally:
            grpc.aio.server = original  # type: ignore[assignment]

    grpc_server.build_grpc_server = build_grpc_server  # type: ignore[assignment]
    from bqemulator import server as emulator_server

    emulator_server.build_grpc_server = build_grpc_server  # type: ignore[assignment]


def patch_schema_updates() -> None:
    """tables.patch/update adding a column adds it to the stored table (stock: only the catalog learns of it, and
    the next statement naming the column fails). Must run before the app includes the router."""
    from bqemulator.api.routes import tables

    for route in tables.router.routes:
        if str(getattr(route, "path", "")).endswith(TABLE_ROUTE) and set(getattr(route, "methods", ())) & {
            "PATCH",
            "PUT",
        }:
            route.endpoint = _adding_columns(route.endpoint)  # type: ignore[attr-defined]


def apply_patches(*, stock: bool = False) -> None:
    import bqemulator

    if bqemulator.__version__ != SUPPORTED_VERSION:
        raise SystemExit(
            f"local_stack.bigquery_emulator supports bqemulator=={SUPPORTED_VERSION}, found {bqemulator.__version__}; "
            "reinstall with `pip install -e '.[local]'`."
        )
    patch_offline_spatial()
    patch_memory_limit()
    if stock:
        return
    patch_job_ids()
    patch_loads()
    patch_no_table_copies()
    patch_schema_updates()
    patch_bignumeric()
    patch_handler_threads()
    bigquery_cdc.apply()


def main(argv: list[str] | None = None) -> None:
    """`python -m local_stack.bigquery_emulator [--stock] start --rest-port P --grpc-port G ...`"""
    args = list(sys.argv[1:] if argv is None else argv)
    stock = "--stock" in args
    if stock:
        args.remove("--stock")
    apply_patches(stock=stock)
    from bqemulator.cli import main as bqemulator_main

    bqemulator_main(args=args, prog_name="bqemulator")


if __name__ == "__main__":
    main()


@dataclass(frozen=True)
class BigQueryEmulatorServer:
    """The emulator as a background server of the local stack (REST for the client, gRPC for Storage APIs)."""

    rest_port: int
    grpc_port: int
    project: str
    root: Path
    stock: bool = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def write_endpoint(self) -> str:
        """The Storage Write API (gRPC, no TLS), as `host:port`."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def process(self) -> ServerProcess:
        return ServerProcess(
            "bigquery (bqemulator)",
            self.rest_port,
            self.root / "bqemulator.pid",
            self.root / "bqemulator.log",
        )

    def _ready(self) -> bool:
        url = f"{self.endpoint}/bigquery/v2/projects/{self.project}/datasets"
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)

    def start(self) -> None:
        staging = self.root / "upload-staging"
        staging.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "local_stack.bigquery_emulator"]
        argv += ["--stock"] if self.stock else []
        argv += [
            "start",
            "--rest-port", str(self.rest_port),
            "--grpc-port", str(self.grpc_port),
            "--data-dir", str(self.root / "data"),
            "--project", self.project,
            "--log-level", "warning",
        ]  # fmt: skip
        env = {
            "BQEMU_UPLOAD_STAGING_DIR": str(staging),
            "BQEMU_GCS_LOCAL_ROOT": str(self.root / "gcs"),
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
        if not self.stock:
            env["BQEMU_WRITE_API_MAX_REQUEST_BYTES"] = str(bigquery_cdc.MAX_REQUEST_BYTES)
        self.process.start(argv, ready=self._ready, env=env, timeout=60, extra_ports=(self.grpc_port,))

    def stop(self) -> bool:
        return self.process.stop()

    def health(self) -> str:
        if not self.process.is_running():
            return "stopped"
        try:
            self._ready()
        except Exception as exc:
            return f"unhealthy: {exc}"
        return f"healthy (project {self.project}{', STOCK' if self.stock else ''})"
