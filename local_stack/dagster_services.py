"""The local Dagster's processes, supervised: one gRPC code server, the webserver and the daemon, both reaching the
code server through a workspace file of their own. What `dagster dev` starts, without its two supervising Python
processes (`dagster dev` itself and the `dagster code-server start` proxy in front of the code server): this
supervisor imports only the standard library. `local_stack/dagster.py` starts it; docs/local-stack.md, "Dagster".

- SIGHUP restarts the code server, which loads the deployed mappings again (`cdc mappings deploy`); the webserver
  sees the new server at once, the daemon at its next workspace refresh. Runs in progress keep their workers. The
  ready file counts the starts and the reloads done, so a caller knows when its own reload is.
- A process that ends by itself is started again (after 1 s, doubling up to 30 s while it keeps ending).
- SIGTERM/SIGINT stops the three and exits.

Usage: python -m local_stack.dagster_services --workspace FILE --port UI_PORT --grpc-port PORT --ready-file FILE
DAGSTER_BIN_DIR
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from local_stack.processes import tcp_open  # standard library only, as this module

LOCATION = "mysql_bigquery_cdc"  # workspace.yaml's location name, kept for the UI and run records
HOST = "127.0.0.1"
MAX_BACKOFF_S = 30.0


def workspace_yaml(grpc_port: int) -> str:
    """The webserver's and the daemon's workspace: the one code server, by port."""
    return (
        "load_from:\n"
        "  - grpc_server:\n"
        f"      host: {HOST}\n"
        f"      port: {grpc_port}\n"
        f"      location_name: {LOCATION}\n"
    )


class Child:
    """One supervised process: its command, the process, and when to start it again if it ended by itself."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.process: subprocess.Popen[bytes] | None = None
        self.backoff = 1.0
        self.restart_at = 0.0
        self.started = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        log(f"{self.name} started (pid {self.process.pid})")

    def stop(self, timeout: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def ended(self) -> int | None:
        """Its exit code if it ended by itself since the last look (then schedules its restart)."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        self.process = None
        if time.monotonic() - self.started > 60:
            self.backoff = 1.0  # it had been running a while: not a crash loop
        self.restart_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_S)
        return code


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} dagster_services: {message}", flush=True)


def wait_for_port(port: int, child: Child, timeout: float, unless: Callable[[], bool]) -> bool:
    """Whether the child listens on `port` within `timeout` (the gRPC server binds it once it has loaded the
    definitions); False if it ended first or `unless()` (stopping)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not unless():
        if child.process is None or child.process.poll() is not None:
            return False
        if tcp_open(port, HOST):
            return True
        time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local_stack.dagster_services")
    parser.add_argument("--workspace", type=Path, required=True, help="the workspace file to write")
    parser.add_argument("--port", type=int, required=True, help="the webserver's port")
    parser.add_argument("--grpc-port", type=int, required=True, help="the code server's port")
    parser.add_argument(
        "--ready-file",
        type=Path,
        required=True,
        help="gets '<starts> <reloads> ready|failed' at each start of the code server",
    )
    parser.add_argument("bin_dir", type=Path, help="the folder of the dagster console scripts")
    args = parser.parse_args(argv)
    args.workspace.write_text(workspace_yaml(args.grpc_port))
    dagster = str(args.bin_dir / "dagster")
    grpc = ["api", "grpc", "--module-name", "definitions", "--attribute", "defs", "--location-name", LOCATION]
    code_server = Child("code server", [dagster, *grpc, "--host", HOST, "--port", str(args.grpc_port)])
    others = [
        Child(
            "webserver",
            [
                str(args.bin_dir / "dagster-webserver"),
                "-w",
                str(args.workspace),
                "-h",
                HOST,
                "-p",
                str(args.port),
            ],
        ),
        Child("daemon", [str(args.bin_dir / "dagster-daemon"), "run", "-w", str(args.workspace)]),
    ]
    stopping = reloading = False

    def on_stop(number: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def on_reload(number: int, frame: FrameType | None) -> None:
        nonlocal reloading
        reloading = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)

    starts = reloads = 0

    def start_code_server() -> bool:
        nonlocal starts
        code_server.start()
        ready = wait_for_port(args.grpc_port, code_server, timeout=300, unless=lambda: stopping)
        starts += 1
        args.ready_file.write_text(f"{starts} {reloads} {'ready' if ready else 'failed'}\n")
        return ready

    if not start_code_server():
        log("the code server did not start: see the lines above")
        code_server.stop()
        raise SystemExit(1)
    for child in others:
        child.start()
    children = [code_server, *others]
    while not stopping:
        time.sleep(0.2)
        if reloading:
            reloading = False
            log("reloading: restarting the code server")
            code_server.stop()
            reloads += 1  # reported with the start that follows: a reload asked before it is done
            ready = start_code_server()
            log("code server ready" if ready else "the code server did not start again: see the lines above")
        for child in children:
            code = child.ended()
            if code is not None:
                log(
                    f"{child.name} ended (exit code {code}); starting it again in {child.restart_at - time.monotonic():.0f} s"
                )
            if child.process is None and time.monotonic() >= child.restart_at:
                start_code_server() if child is code_server else child.start()
    log("stopping")
    for child in reversed(children):
        child.stop()


if __name__ == "__main__":
    main()
