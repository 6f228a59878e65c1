"""The local Dagster: its code server, webserver and daemon in the background (`local_stack.dagster_services`),
with DAGSTER_HOME under the state folder; reloading its code location after a mappings deploy; and failing the runs a stopped or killed
Dagster left in progress (the local run launcher has no health check of its own). Dagster itself is imported only
by the functions that open an instance: starting or stopping the capture should not pay for it."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from cdc.settings import PROJECT_ROOT, Settings, installed_command
from local_stack.processes import ServerProcess, background_service, free_port

if TYPE_CHECKING:
    import dagster as dg

LOCATION = "mysql_bigquery_cdc"  # workspace.yaml
DEFAULT_INSTANCE_YAML = PROJECT_ROOT / "deploy" / "local" / "dagster.yaml"
# its sitecustomize makes the code server fork run workers from a pre-loaded fork server (docstring there)
RUN_WORKER_PRELOAD = Path(__file__).parent / "run_worker_preload"
# glibc's malloc gives each thread that allocates its own arena (up to 8 per core), and a run worker loading tables in
# threads keeps every arena's freed memory: two arenas per process (docs/local-stack.md, "Dagster"); the caller's
# environment may set another value
MALLOC_ARENAS = {"MALLOC_ARENA_MAX": "2"}


class LocalDagster:
    def __init__(self, config: Settings):
        self.config = config
        self.process: ServerProcess = background_service("dagster")
        self.root = config.state_dir / "dagster"
        self.home = self.root / "home"
        self.url_file = self.root / "url"
        self.code_server_file = (
            self.root / "code_server"
        )  # '<starts> ready|failed', by local_stack.dagster_services

    def is_running(self) -> bool:
        return self.process.is_running()

    def url(self) -> str | None:
        return self.url_file.read_text().strip() if self.url_file.is_file() else None

    def start(self, port: int, env: dict[str, str], instance_yaml: Path | None = None) -> list[str]:
        """Start the code server, webserver and daemon (`local_stack.dagster_services`) with the UI on `port`;
        waits until the UI answers; returns what it did about leftover runs."""
        url = f"http://127.0.0.1:{port}"
        self.home.mkdir(parents=True, exist_ok=True)
        self.url_file.write_text(url + "\n")
        shutil.copy(instance_yaml or DEFAULT_INSTANCE_YAML, self.home / "dagster.yaml")
        notes = fail_orphaned_runs(self.home)
        grpc_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "local_stack.dagster_services",
            "--workspace",
            str(self.root / "workspace.yaml"),
        ]
        argv += [
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--ready-file",
            str(self.code_server_file),
        ]
        argv += [str(Path(installed_command("dagster")).parent)]

        def ready() -> bool:
            with urllib.request.urlopen(f"{url}/server_info", timeout=1) as response:
                return bool(response.status == 200)

        path = os.pathsep.join(
            p
            for p in (
                str(RUN_WORKER_PRELOAD),
                str(PROJECT_ROOT),
                env.get("PYTHONPATH", os.environ.get("PYTHONPATH")),
            )
            if p
        )
        self.process.start(
            argv,
            ready=ready,
            env={**MALLOC_ARENAS, **env, "DAGSTER_HOME": str(self.home), "PYTHONPATH": path},
            timeout=180,
            extra_ports=(port, grpc_port),
        )
        if notes:  # in Dagster's log too, where whoever looks into a run left waiting reads
            with self.process.log_file.open("a") as log:
                log.writelines(f"cdc dagster start: {note}\n" for note in notes)
        return notes

    def stop(self, timeout: float = 60) -> bool:
        return self.process.stop(timeout=timeout)

    def reload_code_location(self) -> str:
        """Load the deployed mappings: restart the code server (its definitions are built from them), then reload
        the location in the webserver; a failure raises naming why."""
        url, pid = self.url(), self.process.pid()
        if pid is None or url is None:
            return "Dagster is not running: it loads the deployed mappings when it starts"
        reloads, _ = self._code_server_state()
        os.kill(pid, signal.SIGHUP)  # local_stack.dagster_services restarts the code server
        deadline = time.monotonic() + 300
        while (state := self._code_server_state())[0] <= reloads:
            if time.monotonic() > deadline or not self.is_running():
                raise RuntimeError(f"Dagster did not restart its code server: see {self.process.log_file}")
            time.sleep(0.2)
        if state[1] != "ready":
            raise RuntimeError(f"Dagster could not load the deployed mappings: see {self.process.log_file}")
        from dagster_graphql import DagsterGraphQLClient, ReloadRepositoryLocationStatus

        parsed = urlparse(url)
        info = DagsterGraphQLClient(str(parsed.hostname), port_number=parsed.port).reload_repository_location(
            LOCATION
        )
        if info.status != ReloadRepositoryLocationStatus.SUCCESS:
            raise RuntimeError(
                f"Dagster could not load the deployed mappings: {info.message} (log: {self.process.log_file})"
            )
        return f"Dagster code location {LOCATION} reloaded"

    def _code_server_state(self) -> tuple[int, str]:
        """(reloads done, whether the code server's last start is 'ready' or 'failed')."""
        try:
            _, reloads, status = self.code_server_file.read_text().split()
        except (FileNotFoundError, ValueError):
            return 0, ""
        return int(reloads), status


def instance_home(config: Settings) -> Path:
    """The Dagster instance commands record their runs in: DAGSTER_HOME, or the local Dagster's."""
    return Path(os.environ.get("DAGSTER_HOME") or config.state_dir / "dagster" / "home")


def open_instance(config: Settings) -> dg.DagsterInstance | None:
    """The Dagster instance of DAGSTER_HOME (locally: the one `cdc dagster start` runs), or None if there is none."""
    import dagster as dg

    home = instance_home(config)
    return dg.DagsterInstance.from_config(str(home)) if (home / "dagster.yaml").is_file() else None


def processes_of_instance(home: Path) -> list[int]:
    """The processes still running with DAGSTER_HOME=home outside this session: what is left of an earlier Dagster of
    this instance (its run workers are spawned by the code server and inherit its environment)."""
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


def fail_orphaned_runs(home: Path) -> list[str]:
    """Mark failed the runs a stopped or killed Dagster left STARTING/STARTED whose processes are gone.

    Locally a run's worker is a process of the local Dagster's session, so it stops with it, and the default run
    launcher has no worker health check: such a run would stay "started" forever, holding its pool slots and making
    the SQS sensor wait for it. Failed, it is alerted on, its slots are freed by run monitoring, and its files (never
    acknowledged in SQS) load in a later run. A run is left alone while a process that wrote one of its events (its
    worker, the daemon that launched it) still runs with this DAGSTER_HOME - or, for a run that has no such event
    yet, while any process of an earlier Dagster of this instance does."""
    leftovers = set(processes_of_instance(home))
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home))
    notes = []
    try:
        records = instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])
        )
        for record in records:
            run = record.dagster_run
            events = instance.all_logs(run.run_id)
            writers = {e.dagster_event.pid for e in events if e.dagster_event and e.dagster_event.pid}
            alive = sorted(writers & leftovers) if writers else sorted(leftovers)
            if alive:
                notes.append(
                    f"run {run.run_id} left alone: process(es) {alive} of an earlier Dagster of this instance "
                    "still run"
                )
                continue
            instance.report_run_failed(
                run,
                "its run worker is gone: Dagster was stopped or killed while the run was in progress (found by "
                "`cdc dagster start`); files it did not load were never acknowledged in SQS and load in a later run",
            )
            notes.append(f"run {run.run_id} left in progress by the previous Dagster: marked failed")
    finally:
        instance.dispose()
    return notes
