"""Running the capture: a process per cluster under a supervisor that restarts crashed ones, the stopped-capture
alert, and reading or resetting a cluster's status and checkpoint. Configuration comes from `cdc.settings`."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from capture.service import CaptureError, CaptureSettings, ClusterCapture
from capture.sink import S3Store
from cdc import settings
from cdc.alerts import Webhook
from cdc.clients import aws_client
from cdc.mappings import ClusterMapping, Mappings
from cdc.settings import Settings
from cdc.source import cluster_connection

# Exit code of a cluster's capture that stopped on a CaptureError (needs an operator: e.g. a purged binlog). The
# supervisor restarts a capture that exited any other way (a crash); this one it leaves stopped.
CAPTURE_STOPPED = 3
RESTART_DELAY_S = 5.0

log = logging.getLogger("cdc.capture")


def s3_store(config: Settings) -> S3Store:
    return S3Store(
        aws_client("s3", config.values),
        bucket=config.require(settings.LANDING_BUCKET),
        prefix=config.landing_prefix,
    )


def run_cluster(
    cluster: ClusterMapping, mappings: Mappings, capture_settings: CaptureSettings, config: Settings
) -> None:
    """Capture one cluster in this process until SIGTERM; a CaptureError is alerted, then raised."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s capture[{cluster.cluster}] %(levelname)s %(message)s",
        force=True,
    )
    capture = ClusterCapture(
        cluster, cluster_connection(cluster, config), s3_store(config), capture_settings, mappings.directory
    )
    capture.install_signal_handlers()
    try:
        capture.run()
    except CaptureError as exc:
        alert_capture_stopped(cluster.cluster, str(exc), config)
        raise


def alert_capture_stopped(cluster: str, reason: str, config: Settings) -> None:
    """Post a stopped capture to the alert webhook, like the pipeline's own alerts."""
    try:
        Webhook(config.alert_webhook_url).post(f"CDC capture of {cluster} stopped", [reason], log)
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


def capture_status(mappings: Mappings, config: Settings) -> list[dict[str, Any]]:
    """Each cluster's status document (state, lag, rows, checkpoint, errors), as the capture last wrote it."""
    store = s3_store(config)
    return [
        store.read_json("status", cluster.cluster) or {"cluster": cluster.cluster, "state": "never run"}
        for cluster in mappings.clusters
    ]


def forget_checkpoint(cluster: str, config: Settings) -> None:
    """The cluster's next capture run starts with a new full load (a re-snapshot of the cluster)."""
    s3_store(config).delete_json("checkpoints", cluster)
