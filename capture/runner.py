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

from capture.service import CaptureSettings, ClusterCapture, MySQLConnection
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


def run_cluster(cluster: ClusterMapping, mappings: Mappings, settings: CaptureSettings) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s capture[{cluster.cluster}] %(levelname)s %(message)s",
        force=True,
    )
    capture = ClusterCapture(cluster, mysql_connection(cluster), s3_store(), settings, mappings.directory)
    capture.install_signal_handlers()
    capture.run()


def run_clusters(argv_for: Sequence[list[str]]) -> int:
    """Supervise one capture process per cluster; SIGTERM/SIGINT are passed on, and it waits for all."""
    children = [subprocess.Popen(argv) for argv in argv_for]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(child.poll() is None for child in children):
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
