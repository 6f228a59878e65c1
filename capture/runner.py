"""Running the capture: configuration from the environment, one process per cluster, status and reset."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capture.service import CaptureError, CaptureSettings, ClusterCapture, MySQLConnection
from capture.sink import S3Store
from cdc import environment
from cdc.clients import aws_client
from cdc.mappings import ClusterMapping, Mappings


def mysql_connection(cluster: ClusterMapping, environ: Mapping[str, str] | None = None) -> MySQLConnection:
    """The cluster's connection, from the environment variables its mapping names (never from the file)."""
    c = cluster.connection
    return MySQLConnection(
        host=environment.require(c.host_env, environ),
        port=int(environment.require(c.port_env, environ)),
        user=environment.require(c.user_env, environ),
        password=environment.require(c.password_env, environ),
    )


def s3_store(environ: Mapping[str, str] | None = None) -> S3Store:
    values = environment.resolved(environ)
    return S3Store(
        aws_client("s3", environ),
        bucket=environment.require(environment.LANDING_BUCKET, environ),
        prefix=values.get(environment.LANDING_PREFIX, environment.DEFAULT_LANDING_PREFIX),
    )


# Exit code of a cluster's capture that stopped on a CaptureError (needs an operator: e.g. a purged binlog). The
# supervisor restarts a capture that exited any other way (a crash); this one it leaves stopped.
CAPTURE_STOPPED = 3
RESTART_DELAY_S = 5.0

log = logging.getLogger("cdc.capture")


def run_cluster(cluster: ClusterMapping, mappings: Mappings, settings: CaptureSettings) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s capture[{cluster.cluster}] %(levelname)s %(message)s",
        force=True,
    )
    capture = ClusterCapture(cluster, mysql_connection(cluster), s3_store(), settings, mappings.directory)
    capture.install_signal_handlers()
    try:
        capture.run()
    except CaptureError as exc:
        alert_capture_stopped(cluster.cluster, str(exc))
        raise


def alert_capture_stopped(cluster: str, reason: str) -> None:
    """Post a stopped capture to the alert webhook (CDC_ALERT_WEBHOOK_URL), like the pipeline's own alerts."""
    from sensors.alerts import AlertWebhookResource  # only on this path: it imports Dagster

    url = environment.resolved().get(environment.ALERT_WEBHOOK_URL, "")
    try:
        AlertWebhookResource(url=url).post(f"CDC capture of {cluster} stopped", [reason], log)
    except Exception as exc:  # the capture's own error is what matters; the status keeps it too
        log.error("could not post the alert (%s)", exc)


def run_clusters(argv_for: Sequence[list[str]], restart_delay_s: float = RESTART_DELAY_S) -> int:
    """Supervise one capture process per cluster; SIGTERM/SIGINT are passed on, and it waits for all. A capture
    that crashed is started again after `restart_delay_s` (it resumes from its checkpoint); one that stopped on a
    CaptureError (exit code CAPTURE_STOPPED) stays stopped: its status and alert say what to do."""
    children = [subprocess.Popen(argv) for argv in argv_for]
    restart_at: dict[int, float] = {}
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        running = False
        for index, child in enumerate(children):
            code = child.poll()
            if code is None:
                running = True
            elif not stopping and code not in (0, CAPTURE_STOPPED):
                running = True
                if index not in restart_at:
                    log.error(
                        "capture %s exited with %s; starting it again in %.0f s",
                        " ".join(argv_for[index][1:]),
                        code,
                        restart_delay_s,
                    )
                    restart_at[index] = time.monotonic() + restart_delay_s
                elif time.monotonic() >= restart_at[index]:
                    del restart_at[index]
                    children[index] = subprocess.Popen(argv_for[index])
        if not running:
            break
        time.sleep(0.2)
    return max(child.returncode or 0 for child in children)


def cdc_command() -> str:
    return str(Path(sys.executable).with_name("cdc"))


def background_process() -> Any:
    """The capture as a background service of the local platform (pid and log under the state folder)."""
    from local_stack.processes import background_service

    return background_service("capture")


def capture_status(mappings: Mappings) -> list[dict[str, Any]]:
    store = s3_store()
    return [
        store.read_json("status", cluster.cluster) or {"cluster": cluster.cluster, "state": "never run"}
        for cluster in mappings.clusters
    ]
