"""One private MariaDB server per mapped cluster: the local stand-in for a production MySQL/Aurora cluster.

Each server has its own data folder and binlog, configured as the capture needs it (docs/local-stack.md):
ROW format, FULL row image, FULL row metadata, GTID, utf8mb4, UTC. Two accounts are created: a replication
account with only the grants CDC capture needs, and an admin account that the demo workload writes with.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pymysql

from local_stack.processes import ServerProcess, StackError

REPLICATION_USER = "cdc_replicator"
MAX_SOCKET_PATH = 100  # bytes; a Unix socket's path has at most 107
ADMIN_USER = "cdc_admin"
# What the capture needs: snapshot reads, binlog streaming, binlog positions (MariaDB's BINLOG MONITOR).
REPLICATION_GRANTS = "SELECT, REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR"


@dataclass(frozen=True)
class MariaDBServer:
    cluster: str
    port: int
    root: Path  # this cluster's folder under the state dir
    replication_password: str
    admin_password: str

    @property
    def server_id(self) -> int:
        """Unique per cluster (GTIDs carry it), stable across restarts, and outside the range the capture uses
        for its replica connections (100,000-1,099,999)."""
        return 2_000_000 + zlib.crc32(self.cluster.encode()) % 2_000_000_000

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def tmpdir(self) -> Path:
        """Its own: a starting server removes every `#sql*` file in its temporary folder, so servers sharing /tmp
        (two stacks at once) deleted each other's temporary tables."""
        return self.root / "tmp"

    @property
    def socket(self) -> Path:
        """In the cluster's folder; in the temporary folder, named after it, where that path would pass the
        108 bytes a Unix socket's path may have (a deep state folder, e.g. a pytest worker's)."""
        beside = self.root / "mysqld.sock"
        if len(str(beside)) <= MAX_SOCKET_PATH:
            return beside
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"cdc-mysqld-{digest}.sock"

    @property
    def process(self) -> ServerProcess:
        return ServerProcess(
            name=f"mariadb[{self.cluster}]",
            port=self.port,
            pid_file=self.root / "mariadbd.pid.cdc",
            log_file=self.root / "mariadbd.log",
        )

    def _initialise(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return
        install_db = _binary("mariadb-install-db")
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                install_db,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "TMPDIR": str(self.tmpdir)},
        )
        if result.returncode != 0:
            shutil.rmtree(self.datadir, ignore_errors=True)
            raise StackError(
                f"mariadb[{self.cluster}]: mariadb-install-db failed (exit {result.returncode}):\n"
                f"{result.stderr[-2000:]}"
            )

    def argv(self) -> list[str]:
        binlog_dir = self.root / "binlog"
        binlog_dir.mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        return [
            _binary("mariadbd"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket}",
            f"--tmpdir={self.tmpdir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            f"--pid-file={self.root / 'mariadbd.pid'}",
            "--user=root",
            f"--server-id={self.server_id}",
            f"--log-bin={binlog_dir / 'mysql-bin'}",
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            "--binlog-row-metadata=FULL",
            "--gtid-strict-mode=ON",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--default-time-zone=+00:00",
            "--sql-mode=NO_ENGINE_SUBSTITUTION",  # the seed's games write zero dates; keep them possible
            # sized for a laptop running six of them (docs/local-stack.md): ~90 MB each instead of ~160 MB
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-buffer-size=4M",
            "--aria-pagecache-buffer-size=8M",  # Aria holds only internal temporary tables here
            "--key-buffer-size=8M",  # MyISAM: unused
            "--table-open-cache=256",
            "--table-definition-cache=256",
            "--thread-cache-size=4",
            "--innodb-log-file-size=64M",
            "--performance-schema=OFF",
            "--max-connections=200",
            "--expire-logs-days=7",
        ]

    def _root_connection(self) -> pymysql.connections.Connection:
        return pymysql.connect(unix_socket=str(self.socket), user="root", password="", connect_timeout=2)

    def _ready(self) -> bool:
        with self._root_connection() as connection, connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return cursor.fetchone() == (1,)

    def start(self, timeout: float = 60.0) -> None:
        self._initialise()
        self.process.start(self.argv(), ready=self._ready, timeout=timeout)
        self._ensure_accounts()

    def stop(self) -> bool:
        return self.process.stop(timeout=60)

    def _ensure_accounts(self) -> None:
        with self._root_connection() as connection, connection.cursor() as cursor:
            for user, password, grants in (
                (REPLICATION_USER, self.replication_password, REPLICATION_GRANTS),
                (ADMIN_USER, self.admin_password, "ALL PRIVILEGES"),
            ):
                cursor.execute("CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED BY %s", (user, password))
                cursor.execute("ALTER USER %s@'%%' IDENTIFIED BY %s", (user, password))
                cursor.execute(f"GRANT {grants} ON *.* TO %s@'%%'", (user,))

    def health(self) -> str:
        """One line for `cdc stack status`."""
        if not self.process.is_running():
            return "stopped"
        try:
            with self._root_connection() as connection, connection.cursor() as cursor:
                cursor.execute("SELECT @@gtid_binlog_pos, @@binlog_format, @@binlog_row_metadata")
                gtid, binlog_format, metadata = cursor.fetchone()  # type: ignore[misc]
        except pymysql.MySQLError as exc:
            return f"unhealthy: {exc}"
        return f"healthy (binlog {binlog_format}/{metadata}, gtid {gtid or '-'})"

    def connect(
        self, user: str, password: str, database: str | None = None
    ) -> pymysql.connections.Connection:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            password=password,
            database=database,
            charset="utf8mb4",
            autocommit=False,
        )


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        raise StackError(
            f"{name} is not installed. Install MariaDB with "
            "`apt-get install -y mariadb-server` (make demo / make test do this for you)."
        )
    return path
