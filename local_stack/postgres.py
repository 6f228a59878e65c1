"""A private PostgreSQL server for the Dagster instance's storage: the local stand-in for production's Postgres.

Debian's `postgresql` package (binaries under /usr/lib/postgresql/<version>/bin). PostgreSQL refuses to run as
root, so the server runs as the package's `postgres` user, in a data folder it owns, on 127.0.0.1 and a port of
our choosing; a database and a password user are created for Dagster.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from local_stack.processes import ServerProcess, StackError

OS_USER = "postgres"


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise StackError(
            f"{name} not found: install Debian's postgresql package (apt-get install postgresql)"
        )
    return found[-1]


def _as_postgres(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", OS_USER, "--", *argv], capture_output=True, text=True, check=False
    )


@dataclass(frozen=True)
class PostgresServer:
    port: int
    root: Path
    database: str = "dagster"
    user: str = "dagster"
    password: str = "dagster-local"  # a throwaway local server on 127.0.0.1; production reads it from the env

    def __post_init__(self) -> None:
        for value in (self.database, self.user, self.password):
            if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
                raise StackError(
                    f"postgres: {value!r} must be letters, digits, '_' or '-' (it is written into SQL)"
                )

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def process(self) -> ServerProcess:
        return ServerProcess(
            name="postgres",
            port=self.port,
            pid_file=self.root / "postgres.pid.cdc",
            log_file=self.root / "postgres.log",
        )

    def environment(self) -> dict[str, str]:
        """The variables deploy/postgres/dagster.yaml reads."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": self.database,
        }

    def _initialise(self) -> None:
        if (self.datadir / "PG_VERSION").is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, OS_USER, OS_USER)
        result = _as_postgres(
            _binary("initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        if result.returncode != 0:
            raise StackError(f"postgres: initdb failed (exit {result.returncode}):\n{result.stderr[-2000:]}")

    def _psql(self, sql: str, database: str = "postgres") -> subprocess.CompletedProcess[str]:
        return _as_postgres(
            _binary("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
            "-v", "ON_ERROR_STOP=1", "-At", "-c", sql,
        )  # fmt: skip

    def scalar(self, sql: str) -> str:
        """One value from the Dagster database (for tests and diagnostics)."""
        result = self._psql(sql, self.database)
        if result.returncode != 0:
            raise StackError(f"postgres: {sql}: {result.stderr[-500:]}")
        return result.stdout.strip()

    def _ready(self) -> bool:
        return self._psql("SELECT 1").returncode == 0

    def start(self, timeout: float = 60.0) -> None:
        self._initialise()
        argv = [
            "runuser", "-u", OS_USER, "--", _binary("postgres"), "-D", str(self.datadir), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
        ]  # fmt: skip
        self.process.start(argv, ready=self._ready, timeout=timeout)
        query = f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"  # noqa: S608 - validated above
        if self._psql(query).stdout.strip() != "1":
            for sql in (
                f"CREATE USER {self.user} WITH PASSWORD '{self.password}'",
                f"CREATE DATABASE {self.database} OWNER {self.user}",
            ):
                result = self._psql(sql)
                if result.returncode != 0:
                    raise StackError(f"postgres: {sql.split(' WITH')[0]} failed: {result.stderr[-500:]}")

    def stop(self) -> bool:
        return self.process.stop()
