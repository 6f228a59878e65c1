"""Running the capture: every cluster in one process, a thread each, failures isolated; the stopped-capture alert;
reading or resetting a cluster's status and checkpoint. Configuration comes from `cdc.settings`; the process's
supervisor is `capture.supervisor` (docs/design.md, "Capture")."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from capture.service import TRANSIENT_ERRORS, CaptureError, CaptureSettings, ClusterCapture
from capture.sink import S3Store
from capture.supervisor import CAPTURE_STOPPED, RESTART_DELAY_S
from cdc import settings
from cdc.alerts import Webhook
from cdc.clients import aws_client
from cdc.mappings import ClusterMapping, Mappings
from cdc.settings import Settings
from cdc.source import cluster_connection

__all__ = ["CAPTURE_STOPPED", "capture_status", "forget_checkpoint", "run_clusters"]

log = logging.getLogger("cdc.capture")
RESET_POLL_S = 2.0  # a stopped cluster looks this often for `cdc capture reset`


def s3_store(config: Settings) -> S3Store:
    return S3Store(
        aws_client("s3", config.values),
        bucket=config.require(settings.LANDING_BUCKET),
        prefix=config.landing_prefix,
    )


class ClusterThread(threading.Thread):
    """One cluster's capture on a thread of its own. A CaptureError (a purged binlog) or a configuration error stops
    this cluster only, with its status and an alert; anything else (a bug met on some row) is logged and the
    cluster's capture starts again from its checkpoint after `restart_delay_s`. No error leaves the thread."""

    def __init__(
        self,
        cluster: ClusterMapping,
        mappings: Mappings,
        capture_settings: CaptureSettings,
        config: Settings,
        store: S3Store,
        stop: threading.Event,
        restart_delay_s: float,
    ):
        super().__init__(name=cluster.cluster, daemon=True)
        self.cluster = cluster
        self.mappings = mappings
        self.capture_settings = capture_settings
        self.config = config
        self.store = store
        self.stop_requested = stop
        self.restart_delay_s = restart_delay_s
        self.stopped_on: str | None = None  # the error that stopped this cluster for good

    def run(self) -> None:
        name = self.cluster.cluster
        try:
            connection = cluster_connection(self.cluster, self.config)
        except RuntimeError as exc:  # a variable its mapping names is unset or not a number
            self._stopped(f"cluster {name}: {exc}")
            with contextlib.suppress(*TRANSIENT_ERRORS):
                self.store.write_json(
                    "status",
                    name,
                    {"cluster": name, "state": "failed", "pid": os.getpid(), "errors": [str(exc)]},
                )
            return
        while not self.stop_requested.is_set():
            capture = ClusterCapture(
                self.cluster,
                connection,
                self.store,
                self.capture_settings,
                self.mappings.directory,
                stop_requested=self.stop_requested,
            )
            try:
                capture.run()
                return
            except CaptureError as exc:  # its status says so already
                self._stopped(str(exc))
                if not self._wait_for_reset():
                    return
            except Exception:
                log.exception(
                    "capture of %s failed; starting it again from its checkpoint in %.0f s",
                    name,
                    self.restart_delay_s,
                )
                self.stop_requested.wait(self.restart_delay_s)

    def _wait_for_reset(self) -> bool:
        """Wait until an operator forgets this cluster's checkpoint (`cdc capture reset`, the remedy its error
        names); True: start again, with a new full load. False: the process is stopping."""
        while not self.stop_requested.wait(RESET_POLL_S):
            with contextlib.suppress(*TRANSIENT_ERRORS):
                if self.store.read_json("checkpoints", self.cluster.cluster) is None:
                    log.info("checkpoint of %s reset: starting again with a full load", self.cluster.cluster)
                    self.stopped_on = None
                    return True
        return False

    def _stopped(self, reason: str) -> None:
        self.stopped_on = reason
        log.error("capture of %s stopped: %s", self.cluster.cluster, reason)
        alert_capture_stopped(self.cluster.cluster, reason, self.config)


class StopSignals:
    """SIGTERM and SIGINT ask the capture threads to stop. The handler only notes the signal, and the main thread
    passes it on (`pass_on`) between its timed joins: a handler runs between two bytecodes of the main thread, maybe
    inside its own `Event.set` for an earlier signal, and setting the event again there waited forever for the
    event's lock. A stop arrives twice as a rule: `cdc capture stop` signals the process group, and the supervisor
    passes its own signal on too. The capture then hung until its SIGKILL, without its last flush and status."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.received: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def pass_on(self) -> None:
        if self.received is not None:
            self.stop.set()


def run_clusters(
    clusters: Sequence[ClusterMapping],
    mappings: Mappings,
    capture_settings: CaptureSettings,
    config: Settings,
    restart_delay_s: float = RESTART_DELAY_S,
) -> dict[str, str]:
    """Capture `clusters` in this process, a thread each, until SIGTERM/SIGINT (each flushes and checkpoints
    first; a cluster stopped on a CaptureError waits for `cdc capture reset` meanwhile) or until every thread has
    ended (e.g. each cluster's mapping names an unset variable); return the clusters stopped on an error then."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s capture[%(threadName)s] %(levelname)s %(message)s", force=True
    )
    stop = threading.Event()
    signals = StopSignals(stop)
    signals.install()
    # each cluster its own S3 client, made here: creating boto3 clients is not thread-safe (using them is)
    threads = [
        ClusterThread(cluster, mappings, capture_settings, config, s3_store(config), stop, restart_delay_s)
        for cluster in clusters
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a timed join, so the signal handlers run and their stop is passed on
            thread.join(timeout=0.2)
            signals.pass_on()
    return {thread.cluster.cluster: thread.stopped_on for thread in threads if thread.stopped_on is not None}


def alert_capture_stopped(cluster: str, reason: str, config: Settings) -> None:
    """Post a stopped capture to the alert webhook, like the pipeline's own alerts."""
    try:
        Webhook(config.alert_webhook_url).post(f"CDC capture of {cluster} stopped", [reason], log)
    except Exception as exc:  # the capture's own error is what matters; the status keeps it too
        log.error("could not post the alert (%s)", exc)


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
