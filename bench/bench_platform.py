"""The benchmark's platform and what it costs: the local stack, capture and Dagster started as a user starts them
(`cdc` commands, in a private state folder), and a sampler of every component's memory and CPU.

Components are found by process session: every background service is started in its own session, so all its
processes (Dagster's webserver, daemon, code servers and run workers; the capture's supervisor and per-cluster
processes) carry the service's pid as their session id. The benchmark's own load generators are registered by pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CDC = str(Path(sys.executable).with_name("cdc"))
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class BenchPlatform:
    """The whole local platform in `state` (a fresh folder under the git-ignored .state)."""

    state: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CDC_STATE_DIR": str(self.state), **self.extra_env}

    def cdc(self, *args: str, timeout: float = 900) -> str:
        result = subprocess.run(
            [CDC, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"cdc {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def stack_env(self) -> dict[str, str]:
        """The platform's configuration, as `cdc stack env` gives it."""
        data = json.loads((self.state / "stack.json").read_text())
        return {str(k): str(v) for k, v in data["env"].items()}

    def service_pids(self) -> dict[str, int]:
        """Each background service's session leader: MariaDB per cluster, moto, the BigQuery server, capture,
        Dagster."""
        found = {}
        for pid_file in self.state.rglob("*.pid"):
            try:
                pid = int(pid_file.read_text().strip())
            except ValueError:
                continue
            relative = pid_file.relative_to(self.state).parts
            if relative[0] == "mariadb":
                name = f"mariadb[{relative[1]}]"
            else:
                name = relative[0]
            found[name] = pid
        return found


def _processes() -> dict[int, tuple[int, str, float, int]]:
    """Every process: pid -> (session id, command line, CPU seconds, RSS bytes)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
            fields = stat.rsplit(")", 1)[1].split()
            session = int(fields[3])
            cpu = (int(fields[11]) + int(fields[12])) / TICKS
            rss = int(fields[21]) * PAGE
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (session, command, cpu, rss)
    return table


def component_of(name: str, command: str) -> str:
    """The component a process of service `name` belongs to (Dagster's run workers are counted apart)."""
    if name.startswith("mariadb["):
        return "MariaDB (6 servers)"
    if name == "dagster":
        return (
            "Dagster run workers"
            # a run worker: `dagster api execute_run`, or the code server's multiprocessing child
            if "execute_run" in command or "api execute" in command or "spawn_main" in command
            else "Dagster services"
        )
    return {"moto": "moto (S3+SQS)", "bigquery": "BigQuery server", "capture": "capture (6 clusters)"}.get(
        name, name
    )


class Sampler(threading.Thread):
    """Samples RSS and CPU of every component every `interval` seconds until stopped."""

    def __init__(self, platform: BenchPlatform, interval: float = 0.5):
        super().__init__(daemon=True)
        self.platform = platform
        self.interval = interval
        self.extra: dict[int, str] = {}  # session -> component (the benchmark's own load generators)
        self.stop_event = threading.Event()
        self.totals: list[tuple[float, dict[str, int]]] = []  # (time, RSS bytes per component)
        self.cpu: dict[int, list[tuple[float, float]]] = defaultdict(list)  # pid -> [(time, CPU seconds)]
        self.owner: dict[int, str] = {}  # pid -> component

    def register(self, pid: int, component: str) -> None:
        self.extra[pid] = component

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        now = time.time()
        services = {pid: name for name, pid in self.platform.service_pids().items()}
        rss: dict[str, int] = defaultdict(int)
        for pid, (session, command, cpu, resident) in _processes().items():
            if session in self.extra:  # a load generator (started in its own session) and its children
                component = self.extra[session]
            elif session in services:
                component = component_of(services[session], command)
            else:
                continue
            rss[component] += resident
            self.owner[pid] = component
            self.cpu[pid].append((now, cpu))
        self.totals.append((now, dict(rss)))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)

    def peak_rss_mb(self) -> dict[str, float]:
        peaks: dict[str, int] = defaultdict(int)
        for _, sample in self.totals:
            for component, value in sample.items():
                peaks[component] = max(peaks[component], value)
        return {k: round(v / 2**20, 1) for k, v in sorted(peaks.items())}

    def peak_total_rss_mb(self, exclude: tuple[str, ...] = ()) -> float:
        best = 0
        for _, sample in self.totals:
            best = max(best, sum(v for k, v in sample.items() if k not in exclude))
        return round(best / 2**20, 1)

    def cpu_seconds(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each component used between `start` and `end` (wall-clock epoch seconds)."""
        used: dict[str, float] = defaultdict(float)
        for pid, series in self.cpu.items():
            before = [c for t, c in series if t <= start]
            within = [c for t, c in series if t <= end]
            if not within:
                continue
            base = before[-1] if before else 0.0 if series[0][0] > start else within[0]
            used[self.owner[pid]] += max(0.0, within[-1] - base)
        return {k: round(v, 1) for k, v in sorted(used.items())}


def stop_leftovers(state: Path) -> list[int]:
    """Stop (SIGTERM, then SIGKILL) every process started for the platform in `state` - found by the CDC_STATE_DIR
    in its environment, so a run whose pid files are gone (a killed benchmark) is stopped too."""
    import signal

    marker = f"CDC_STATE_DIR={state}".encode()
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in found:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in found):
                time.sleep(0.2)
    return found


def wait_for(condition: Any, what: str, timeout: float, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
