"""The benchmark's platform and what it costs: the local stack, capture and Dagster started as a user starts them
(`cdc` commands, in a private state folder), and a sampler of every component's memory and CPU.

Components are found by process session: every background service is started in its own session, so all its
processes (Dagster's webserver, daemon, code servers and run workers; the capture's supervisor and the process
capturing every cluster) carry the service's pid as their session id. The benchmark's own load generators are registered by pid.
"""

from __future__ import annotations

import functools
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
    peer_bigquery_endpoint: str = ""  # the peers' own BigQuery server, once started

    sessions: dict[str, Any] = field(default_factory=dict, repr=False)  # admin connections, by cluster

    @functools.cached_property
    def mappings(self) -> Any:
        """The mappings, read once (the replay's wait reads the capture's status every 2 s)."""
        from cdc.mappings import load_mappings

        return load_mappings()

    @functools.cached_property
    def stack(self) -> Any:
        """The platform's local stack (its servers' addresses and credentials), read once it is up: the replay's wait
        asks every cluster's position every 2 s. Each mode's platform brings up its own stack."""
        from local_stack.stack import LocalStack

        return LocalStack(self.mappings, state_dir=self.state)

    def admin_session(self, cluster: str) -> Any:
        """An admin connection to `cluster`'s MariaDB, kept open (autocommit): each new connection builds a TLS
        context, a tenth of a second of CPU - six every 2 s while the replay's wait asks each cluster's position."""
        session = self.sessions.get(cluster)
        if session is not None:
            try:
                session.ping(reconnect=True)
                return session
            except Exception:
                self.sessions.pop(cluster, None)
        user, password = self.stack.admin_credentials(cluster)
        session = self.stack.mariadb(cluster).connect(user, password)
        session.autocommit(True)
        self.sessions[cluster] = session
        return session

    @property
    def peer_env(self) -> dict[str, str]:
        """The environment of the peers: the platform's, with their own BigQuery server."""
        return {**self.env, "CDC_BIGQUERY_ENDPOINT": self.peer_bigquery_endpoint}

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
        # at <service>/ or mariadb/<cluster>/ (not a walk of the whole state folder: the sampler asks twice a second)
        for pid_file in [*self.state.glob("*/*.pid"), *self.state.glob("*/*/*.pid")]:
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


@dataclass(frozen=True)
class ProcessSample:
    session: int
    parent: int
    command: str
    cpu: float  # CPU seconds of the process itself
    children_cpu: float  # CPU seconds of its children that ended and were reaped by it (and theirs)
    rss: int  # bytes


def proportional_set_size(pid: int) -> int | None:
    """A process's PSS in bytes (/proc/<pid>/smaps_rollup): each page shared by n processes counts 1/n in each,
    so processes forked from one parent (run workers from the fork server) are not counted n times, as RSS does."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _processes() -> dict[int, ProcessSample]:
    """Every process, from /proc/<pid>/stat (proc(5): utime, stime, cutime, cstime, rss)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
            fields = stat.rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            table[int(entry.name)] = ProcessSample(
                session=int(fields[3]),
                parent=int(fields[1]),
                command=command,
                cpu=(int(fields[11]) + int(fields[12])) / TICKS,
                children_cpu=(int(fields[13]) + int(fields[14])) / TICKS,
                rss=int(fields[21]) * PAGE,
            )
        except (OSError, IndexError, ValueError):
            continue
    return table


RUN_WORKER_MARKS = ("execute_run", "api execute", "spawn_main", "multiprocessing.forkserver")


def component_of(name: str, command: str) -> str:
    """The component a process of service `name` belongs to (Dagster's run workers are counted apart)."""
    if name.startswith("mariadb["):
        return "MariaDB (6 servers)"
    if name == "dagster":
        return (
            "Dagster run workers"
            # a run worker: `dagster api execute_run`, the code server's multiprocessing child (spawned, or forked
            # from the pre-loaded fork server, which counts with them: local_stack/run_worker_preload)
            if any(mark in command for mark in RUN_WORKER_MARKS)
            else "Dagster services"
        )
    return {"moto": "moto (S3+SQS)", "bigquery": "BigQuery server", "capture": "capture (6 clusters)"}.get(
        name, name
    )


class Sampler(threading.Thread):
    """Samples memory (PSS, else RSS) and CPU of every component every `interval` seconds until stopped.

    CPU includes processes shorter than the interval (Dagster's run workers): a process's children that ended are
    in its `cutime`/`cstime` once it has reaped them. That share is counted for the component of the children
    (`child_component`), and what was already sampled of a reaped child is taken off again, so each CPU second
    is counted once, by the component whose process used it."""

    def __init__(self, platform: BenchPlatform | None, interval: float = 0.5, memory_interval: float = 2.0):
        super().__init__(daemon=True)
        self.platform = platform
        self.interval = interval
        # PSS is read less often than CPU: the kernel walks each process's page tables for it (at every 0.5 s, a
        # twentieth of a core of the two, taken from the platform it measures)
        self.memory_interval = memory_interval
        self.memory_at = 0.0
        self.extra: dict[int, str] = {}  # session -> component (the benchmark's own load generators)
        self.stop_event = threading.Event()
        self.totals: list[tuple[float, dict[str, int]]] = []  # (time, memory bytes per component)
        # pid -> [(time, own CPU seconds, reaped children's CPU seconds)]
        self.cpu: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
        self.owner: dict[int, str] = {}  # pid -> component
        self.parent: dict[int, int] = {}  # pid -> parent pid
        self.child_component: dict[int, str] = {}  # pid -> component of the children it started
        self.sample_times: list[float] = []

    def register(self, pid: int, component: str) -> None:
        self.extra[pid] = component

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        now = time.time()
        services = {pid: name for name, pid in self.platform.service_pids().items()} if self.platform else {}
        memory: dict[str, int] = defaultdict(int)  # bytes of PSS (RSS where PSS cannot be read)
        read_memory = now - self.memory_at >= self.memory_interval
        for pid, process in _processes().items():
            # a load generator (started in its own session) and its children
            if process.session in self.extra:
                component = self.extra[process.session]
            elif process.session in services:
                component = component_of(services[process.session], process.command)
            else:
                continue
            if read_memory:
                pss = proportional_set_size(pid)
                memory[component] += process.rss if pss is None else pss
            self.owner[pid] = component
            self.parent[pid] = process.parent
            if self.child_component.get(process.parent) in (None, self.owner.get(process.parent)):
                self.child_component[process.parent] = component  # a run worker's kind wins over helpers
            self.cpu[pid].append((now, process.cpu, process.children_cpu))
        if read_memory:
            self.totals.append((now, dict(memory)))
            self.memory_at = now
        self.sample_times.append(now)

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
        last_sample = max((t for t in self.sample_times if t <= end), default=start)
        for pid, series in self.cpu.items():
            within = [s for s in series if s[0] <= end]
            if not within:
                continue
            before = [s for s in series if s[0] <= start]
            _, base_own, base_children = before[-1] if before else (0.0, 0.0, 0.0)
            seen_at, own, children = within[-1]
            used[self.owner[pid]] += max(0.0, own - base_own)
            used[self.child_component.get(pid, self.owner[pid])] += max(0.0, children - base_children)
            parent = self.parent.get(pid, 0)
            if start <= seen_at < last_sample and parent in self.cpu:
                # ended and reaped within the window: its parent's children CPU holds all of it
                used[self.child_component.get(parent, self.owner[pid])] -= own + children
        return {k: round(max(0.0, v), 1) for k, v in sorted(used.items())}


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
