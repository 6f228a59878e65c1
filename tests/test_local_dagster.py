"""The local Dagster (`cdc dagster start`): one code server, the webserver and the daemon under a supervisor of our
own (local_stack/dagster_services.py), which starts a crashed code server again and restarts it to load deployed
mappings."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from cdc.settings import STATE_DIR, Settings
from local_stack.dagster import LocalDagster
from local_stack.processes import StackError, free_port
from tests.support.waiting import wait_for


def _session_processes(session: int) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process in the session."""
    processes = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session and fields[0] != "Z":  # a zombie has ended: only not reaped yet
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                processes[int(stat.parent.name)] = (int(fields[1]), cmdline)
        except (OSError, ValueError, IndexError):
            continue
    return processes


def _session_commands(session: int) -> dict[int, str]:
    return {pid: command for pid, (_, command) in _session_processes(session).items()}


def _services(session: int) -> list[str]:
    """The session's commands without its run workers: a run (the standing stream run starts as soon as the daemon
    runs its sensors) is forked by the fork server, shows its command line and may start processes of its own."""
    processes = _session_processes(session)

    def in_a_run(pid: int) -> bool:
        parent = processes.get(pid, (0, ""))[0]
        while parent in processes:
            if "multiprocessing.forkserver" in processes[parent][1]:
                return True
            parent = processes[parent][0]
        return False

    return [command for pid, (_, command) in processes.items() if not in_a_run(pid)]


def _environment(pid: int) -> dict[str, str]:
    """The process's environment ({} when it has ended meanwhile)."""
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _code_servers(session: int) -> list[int]:
    return [pid for pid, command in _session_commands(session).items() if " api grpc " in command]


def _location_loaded(port: int) -> bool:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename } } } } }"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            entries = json.load(response)["data"]["workspaceOrError"]["locationEntries"]
    except OSError:  # the webserver is not answering (yet)
        return False
    return [(e["name"], (e["locationOrLoadError"] or {}).get("__typename")) for e in entries] == [
        ("mysql_bigquery_cdc", "RepositoryLocation")
    ]


def _start_on_a_free_port(local: LocalDagster, env: dict[str, str]) -> int:
    """Start it on a free port; again on another when a test running beside this one took the port between
    `free_port` and the webserver's bind (its log says so). Returns the port."""
    for attempt in range(3):
        port = free_port()
        try:
            local.start(port, env)
            return port
        except StackError:
            log = local.process.log_file.read_text(errors="replace")
            local.stop()
            if "address already in use" not in log or attempt == 2:
                raise
            local.process.log_file.unlink()
    raise AssertionError("unreachable")


def test_the_local_dagster_is_one_code_server_a_webserver_and_a_daemon_and_keeps_its_code_server_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STATE_DIR, str(tmp_path / "state"))
    local = LocalDagster(Settings.load())
    port = _start_on_a_free_port(local, {STATE_DIR: str(tmp_path / "state")})
    try:
        session = local.process.pid()
        assert session is not None
        wait_for(lambda: _location_loaded(port), "the code location in the UI")
        commands = _services(session)
        kinds = {
            "supervisor": [c for c in commands if "local_stack.dagster_services" in c],
            "code server": [c for c in commands if " api grpc " in c],
            "webserver": [c for c in commands if "dagster-webserver" in c],
            "daemon": [c for c in commands if "dagster-daemon run" in c],
            "run workers' fork server": [c for c in commands if "multiprocessing.forkserver" in c],
            "its resource tracker": [c for c in commands if "multiprocessing.resource_tracker" in c],
        }
        assert {kind: len(found) for kind, found in kinds.items()} == dict.fromkeys(kinds, 1), commands
        assert len(commands) == 6, "\n".join(
            commands
        )  # no `dagster dev`, no code-server proxy, no second code server
        environments = {pid: _environment(pid) for pid in _session_commands(session)}
        arenas = {pid: env.get("MALLOC_ARENA_MAX") for pid, env in environments.items() if env}
        assert len(arenas) >= 6 and set(arenas.values()) == {"2"}, (
            arenas
        )  # every service and what it forks: few malloc arenas

        [crashed] = _code_servers(session)
        os.kill(crashed, signal.SIGKILL)  # the supervisor starts it again; the UI finds it again
        wait_for(
            lambda: local.code_server_file.read_text().split()[::2] == ["2", "ready"], "a new code server"
        )
        assert _code_servers(session) not in ([], [crashed])
        wait_for(lambda: _location_loaded(port), "the code location after the code server crashed")

        [before] = _code_servers(session)
        assert local.reload_code_location() == "Dagster code location mysql_bigquery_cdc reloaded"
        [after] = _code_servers(session)
        assert after != before  # restarted: it built its definitions from the mappings again
        assert _location_loaded(port)
    finally:
        assert local.stop()
    assert not _session_commands(session)  # all of it stopped
