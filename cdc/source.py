"""The MySQL/MariaDB side: a cluster's connection (from the environment variables its mapping names, never from
the file) and a consistent snapshot with the binlog position it is consistent with. Used by the capture's full
load, the re-snapshot and the source-vs-BigQuery checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pymysql

from cdc.mappings import ClusterMapping
from cdc.sequence import BinlogPosition
from cdc.settings import Settings


@dataclass(frozen=True)
class MySQLConnection:
    host: str
    port: int
    user: str
    password: str = field(repr=False)

    def settings(self) -> dict[str, Any]:
        """Connection settings in the binlog reader's form."""
        return {"host": self.host, "port": self.port, "user": self.user, "passwd": self.password}

    def connect(self, **extra: Any) -> pymysql.connections.Connection:
        return pymysql.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, charset="utf8mb4", **extra
        )


def cluster_connection(cluster: ClusterMapping, config: Settings) -> MySQLConnection:
    """The cluster's connection, from the environment variables its mapping names."""
    c = cluster.connection
    return MySQLConnection(
        host=config.require(c.host_env),
        port=int(config.require(c.port_env)),
        user=config.require(c.user_env),
        password=config.require(c.password_env),
    )


def begin_consistent_snapshot(cursor: Any) -> BinlogPosition | None:
    """Start a UTC, REPEATABLE READ transaction WITH CONSISTENT SNAPSHOT; return the binlog position it is
    consistent with (MariaDB reports it; None where the server does not)."""
    cursor.execute("SET SESSION time_zone = '+00:00'")
    cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
    cursor.execute("SHOW STATUS WHERE Variable_name IN ('binlog_snapshot_file', 'binlog_snapshot_position')")
    status = {str(name).lower(): value for name, value in cursor.fetchall()}
    if not status.get("binlog_snapshot_file"):
        return None
    return BinlogPosition(status["binlog_snapshot_file"], int(status["binlog_snapshot_position"]))
