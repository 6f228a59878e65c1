"""Local Dagster only: each run's worker forked from a fork server that has already imported Dagster and the code
location, instead of a new Python process that imports them again (seconds of CPU, more on a busy machine).

`cdc dagster start` puts this folder first on the PYTHONPATH of the Dagster processes, so Python imports this module at
start-up in each of its processes. In the code server only (the process that starts run workers: `dagster api grpc`
or `dagster code-server start`), it makes Dagster's `DagsterApiServer` start run workers from a `forkserver`
multiprocessing context instead of `spawn`, with `PRELOAD` imported in the fork server, and starts that fork server
at once. Dagster's run start-up path is otherwise unchanged (same target function, event queue and termination
event: a fork-server child is a spawn-style child that finds its imports done). `CDC_PRELOADED_RUN_WORKERS=0` turns
it off. Production runs never load it: their workers are started by the K8s/ECS run launcher.
docs/local-stack.md, "Dagster".
"""

from __future__ import annotations

import os
import sys
from typing import Any

# Dagster's run entry point, the code location, the S3/SQS service models (run_worker_warmup)
PRELOAD = ["dagster._grpc.impl", "definitions", "run_worker_warmup"]
ENABLED_ENV = "CDC_PRELOADED_RUN_WORKERS"


def is_code_server(argv: list[str]) -> bool:
    return ("api" in argv and "grpc" in argv) or ("code-server" in argv and "start" in argv)


def install() -> None:
    """Patch DagsterApiServer so that its run workers come from the pre-loaded fork server."""
    import multiprocessing
    import multiprocessing.forkserver
    import threading

    from dagster._grpc import server

    original = server.DagsterApiServer.__init__
    if getattr(original, "_cdc_preloaded", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self._mp_ctx = context
        # start it now: its imports then overlap the code server's own start, not the first run's
        threading.Thread(target=multiprocessing.forkserver.ensure_running, daemon=True).start()

    __init__._cdc_preloaded = True  # type: ignore[attr-defined]
    server.DagsterApiServer.__init__ = __init__  # type: ignore[method-assign]


if os.environ.get(ENABLED_ENV, "1") != "0" and is_code_server(list(getattr(sys, "orig_argv", []))):
    try:
        install()
    except Exception as exc:  # a Dagster without this hook: run workers are spawned as usual
        print(f"{__name__}: run workers will be spawned, not forked: {exc!r}", file=sys.stderr)
