"""The MySQL/MariaDB side: a cluster's connection (from the environment variables its mapping names, never from
the file) and a consistent snapshot with the binlog position it is consistent with. Used by the capture's full
load, the re-snapshot and the source-vs-BigQuery checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pymysql

from cdc.mappings import ClusterMapping
from cdc.sequence import BinlogPosition
from cdc.settings import SettingError, Settings

TLS_MODES = ("required", "preferred", "disabled")


@dataclass(frozen=True)
class MySQLConnection:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    tls: str = "preferred"  # one of TLS_MODES (cdc.mappings.Connection.tls_env)

    def tls_arguments(self) -> dict[str, Any]:
        """PyMySQL's arguments for the TLS mode (PyMySQL itself prefers TLS when the server offers it)."""
        if self.tls == "disabled":
            return {"ssl_disabled": True}
        if self.tls == "required":  # MySQL's --ssl-mode=REQUIRED: encrypted, the certificate not verified
            return {"ssl": {"verify_mode": "none"}}
        return {}

    def settings(self) -> dict[str, Any]:
        """Connection settings in the binlog reader's form."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "passwd": self.password,
            **self.tls_arguments(),
        }

    def connect(self, **extra: Any) -> pymysql.connections.Connection:
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            charset="utf8mb4",
            **self.tls_arguments(),
            **extra,
        )


def tls_mode(cluster: ClusterMapping, values: Mapping[str, str]) -> str:
    """The TLS mode of the cluster's connection: the variable its mapping names (`tls_env`), else `preferred`."""
    name = cluster.connection.tls_env
    mode = (values.get(name, "") if name else "").strip().lower() or "preferred"
    if mode not in TLS_MODES:
        raise SettingError(
            f"{name}={mode!r} (the TLS mode of cluster {cluster.cluster}'s connection): use one of "
            + ", ".join(TLS_MODES)
        )
    return mode


def cluster_connection(cluster: ClusterMapping, config: Settings) -> MySQLConnection:
    """The cluster's connection, from the environment variables its mapping names."""
    c = cluster.connection
    return MySQLConnection(
        host=config.require(c.host_env),
        port=int(config.require(c.port_env)),
        user=config.require(c.user_env),
        password=config.require(c.password_env),
        tls=tls_mode(cluster, config.values),
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
