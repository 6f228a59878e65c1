"""The capture's supervisor: keeps one capture process running and starts it again when it crashes.

It imports the standard library only, so the process that waits beside the capture costs a few megabytes, not the
capture's own pyarrow, boto3 and binlog reader (`cdc capture run` replaces itself with it: `exec_supervisor`). A
capture that exits 0 (stopped by a signal) or CAPTURE_STOPPED (a cluster it ran had stopped on an error that needs
an operator, e.g. a purged binlog: its status and alert say what to do) is left stopped; any other exit (kill -9,
a crash) is started again after a delay, and every cluster resumes from its own checkpoint (docs/design.md,
"Capture"). SIGTERM and SIGINT are passed on to the capture, which flushes and checkpoints before it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

# Exit code of a capture in which a cluster had stopped on an error that needs an operator.
CAPTURE_STOPPED = 3
RESTART_DELAY_S = 5.0

log = logging.getLogger("cdc.capture")


def supervise(argv: Sequence[str], restart_delay_s: float = RESTART_DELAY_S) -> int:
    """Run `argv` until it exits 0 or CAPTURE_STOPPED, or a signal asks it to stop; return its exit code."""
    command = " ".join(argv[1:])
    child = subprocess.Popen(list(argv))
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        code = child.wait()
        if stopping or code in (0, CAPTURE_STOPPED):
            return code
        log.error("capture %s exited with %s; starting it again in %.0f s", command, code, restart_delay_s)
        deadline = time.monotonic() + restart_delay_s
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)
        if stopping:
            return code
        child = subprocess.Popen(list(argv))


def exec_supervisor(argv: Sequence[str]) -> None:
    """Replace this process with the supervisor of `argv` (the same pid, so a service manager keeps tracking it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "capture.supervisor", *argv])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s capture-supervisor %(levelname)s %(message)s")
    sys.exit(supervise(sys.argv[1:]))


if __name__ == "__main__":
    main()
