"""Background server processes of the local stack: start detached, wait until ready, report, stop.

Each server runs as a plain background process (no systemd, no Docker) with its pid file and log under the
state folder. Failures name the service, its port and its log, with the log's last lines.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class StackError(RuntimeError):
    """A local-stack service could not be started, reached or stopped; the message says what to do."""


@dataclass(frozen=True)
class ServerProcess:
    """A named background server: how to start it and where its pid file and log live."""

    name: str
    port: int
    pid_file: Path
    log_file: Path

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(
        self,
        argv: Sequence[str],
        *,
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        extra_ports: Sequence[int] = (),
    ) -> None:
        """Start the server detached unless it already runs, then wait until ``ready()`` answers True."""
        if self.is_running():
            wait_until(self, ready, timeout)
            return
        for port in (self.port, *extra_ports):
            ensure_port_free(self.name, port)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # survives the `cdc` command that started it
                preexec_fn=_default_stop_signals,
            )
        self.pid_file.write_text(f"{process.pid}\n")
        wait_until(self, ready, timeout, process=process)

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM, then SIGKILL after ``timeout`` (said on stderr); returns whether a process was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        # Each server was started as its own session: signal the whole group, so its children stop too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            print(  # a server's last flush or checkpoint may be missing: say so, and where to look
                f"{self.name} (pid {pid}) did not stop within {timeout:.0f} s of SIGTERM: killed; its log: "
                f"{self.log_file}",
                file=sys.stderr,
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        _reap(pid)
        _end_group(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def background_service(name: str) -> ServerProcess:
    """A platform service (capture, dagster) run in the background: pid and log in <state>/<name>/."""
    from cdc.settings import state_dir

    root = state_dir() / name
    return ServerProcess(name, 0, root / f"{name}.pid", root / f"{name}.log")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _default_stop_signals() -> None:
    """In the server's process, before it runs: the stop signals' default actions. An ignored signal is inherited
    across exec, and a starter that ignored SIGTERM (a test session did) made every `stop` wait for its SIGKILL."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_DFL)


def _alive(pid: int, group: bool = False) -> bool:
    """Whether the process (or, `group`, any process of the group `pid` leads) still runs. A zombie (exited, not
    reaped yet) does not: its parent reaps it in its own time - or, once the parent has gone, the init process - and
    a stop that waited for a server's zombies waited its whole linger for each server."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if group:
        return _group_runs(pid)
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return True


def _stat(pid: int) -> tuple[str, int]:
    """The process's state letter and process group, from /proc (OSError: it has gone, or there is no /proc)."""
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


def _group_runs(pgid: int) -> bool:
    """Whether a process of the group other than a zombie runs (True where /proc cannot tell)."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            state, group = _stat(pid)
        except OSError:
            continue  # it has just ended
        if group == pgid and state != "Z":
            return True
    return False


def _end_group(pgid: int, linger: float = 5.0) -> None:
    """Wait until nothing is left of the server's process group, SIGKILL what lingers after `linger` s: a helper
    that ignores SIGTERM and ends only when its parent's pipe closes (multiprocessing's resource tracker, beside
    Dagster's run-worker fork server) outlived the stop for a moment, or for good if something else held the pipe."""
    deadline = time.monotonic() + linger
    killed = False
    while _alive(pgid, group=True):
        _reap(pgid)
        if time.monotonic() > deadline:
            if killed:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + linger
        time.sleep(0.1)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ensure_port_free(service: str, port: int) -> None:
    if not port_is_free(port):
        raise StackError(
            f"{service}: port {port} on 127.0.0.1 is already in use by another process. Stop that process "
            f"or choose another port (see `cdc stack up --help` for the port options)."
        )


LOWEST_FREE_PORT = 15000


def _ephemeral_ports_start() -> int:
    """Where the kernel's range of ports for outgoing connections begins (32768 if it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's range for outgoing connections: a port the kernel hands out (bind to 0) comes
    from that range, and a client connection of another process could take it before the server binds it (a test's
    Dagster once found its port taken so)."""
    high = _ephemeral_ports_start()
    if high - LOWEST_FREE_PORT > 1000:
        for _ in range(200):
            port = random.randrange(LOWEST_FREE_PORT, high)
            if port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    server: ServerProcess,
    ready: Callable[[], bool],
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            server.pid_file.unlink(missing_ok=True)
            raise StackError(
                f"{server.name} exited with code {process.returncode} while starting on port {server.port}. "
                f"Log: {server.log_file}\n{server.log_tail()}"
            )
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise StackError(
        f"{server.name} did not answer on port {server.port} within {timeout:.0f} s. "
        f"Log: {server.log_file}\n{server.log_tail()}"
    )
