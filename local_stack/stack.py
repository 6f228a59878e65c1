"""The whole local platform: one MariaDB per mapped cluster, moto for S3+SQS, the BigQuery API server.

Owns bringing the stack up (idempotently, each server waited for), down, its health, and the environment it
provides. Ports, passwords and names are chosen on the first `up` and kept in `<state>/stack.json`, which
`cdc stack env` renders as `export` lines: the one place the platform's configuration comes from locally.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cdc import settings as env_names
from cdc.clients import bigquery_client
from cdc.mappings import Mappings
from local_stack.aws import ACCESS_KEY, REGION, SECRET_KEY, AwsNames, MotoServer
from local_stack.bigquery_emulator import BigQueryEmulatorServer
from local_stack.mariadb import ADMIN_USER, REPLICATION_USER, MariaDBServer
from local_stack.processes import free_port

DEFAULT_MARIADB_BASE_PORT = 33061
DEFAULT_MOTO_PORT = 4566
DEFAULT_BIGQUERY_PORT = 9050
DEFAULT_BIGQUERY_GRPC_PORT = 9060


@dataclass
class StackSettings:
    """Everything `cdc stack up` decides once and keeps; env vars CDC_STACK_* and CLI options override."""

    mariadb_base_port: int = DEFAULT_MARIADB_BASE_PORT
    moto_port: int = DEFAULT_MOTO_PORT
    bigquery_port: int = DEFAULT_BIGQUERY_PORT
    bigquery_grpc_port: int = DEFAULT_BIGQUERY_GRPC_PORT
    bigquery_project: str = "local-cdc"
    bucket: str = "cdc-landing"
    prefix: str = env_names.DEFAULT_LANDING_PREFIX
    queue: str = "cdc-landing-events"
    dead_letter_queue: str = "cdc-landing-events-dlq"
    max_receive_count: int = 5
    visibility_timeout_s: int = 60
    cluster_ports: dict[str, int] = field(default_factory=dict)
    passwords: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def aws_names(self) -> AwsNames:
        return AwsNames(
            bucket=self.bucket,
            prefix=self.prefix,
            queue=self.queue,
            dead_letter_queue=self.dead_letter_queue,
            max_receive_count=self.max_receive_count,
            visibility_timeout_s=self.visibility_timeout_s,
        )


ENV_OVERRIDES = {
    "CDC_STACK_MARIADB_BASE_PORT": "mariadb_base_port",
    "CDC_STACK_MOTO_PORT": "moto_port",
    "CDC_STACK_BIGQUERY_PORT": "bigquery_port",
    "CDC_STACK_BIGQUERY_GRPC_PORT": "bigquery_grpc_port",
    "CDC_STACK_MAX_RECEIVE_COUNT": "max_receive_count",
    "CDC_STACK_VISIBILITY_TIMEOUT_S": "visibility_timeout_s",
}


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    port: int
    health: str

    @property
    def healthy(self) -> bool:
        return self.health.startswith("healthy")


class LocalStack:
    def __init__(self, mappings: Mappings, state_dir: Path | None = None):
        self.mappings = mappings
        self.state_dir = state_dir or env_names.state_dir()
        self.state_file = self.state_dir / "stack.json"
        self.settings = self._load_settings()

    # -- settings ----------------------------------------------------------------------------------------------

    def _load_settings(self) -> StackSettings:
        if self.state_file.is_file():
            saved = json.loads(self.state_file.read_text(encoding="utf-8")).get("settings", {})
            return StackSettings(**saved)
        settings = StackSettings()
        for variable, attribute in ENV_OVERRIDES.items():
            if os.environ.get(variable):
                setattr(settings, attribute, int(os.environ[variable]))
        return settings

    def configure(self, *, free_ports: bool = False, **overrides: Any) -> None:
        """With ``free_ports``, pick unused ports for everything; then apply explicit overrides (None = keep)."""
        if free_ports:
            self.settings.moto_port = free_port()
            self.settings.bigquery_port = free_port()
            self.settings.bigquery_grpc_port = free_port()
            self.settings.cluster_ports = {cluster.cluster: free_port() for cluster in self.mappings.clusters}
        elif overrides.get("mariadb_base_port") is not None:
            self.settings.cluster_ports = {}  # re-derive every cluster's port from the new base
        for key, value in overrides.items():
            if value is not None:
                setattr(self.settings, key, value)
        self._assign_cluster_ports()

    def _assign_cluster_ports(self) -> None:
        used = set(self.settings.cluster_ports.values())
        next_port = self.settings.mariadb_base_port
        for cluster in sorted(c.cluster for c in self.mappings.clusters):
            if cluster in self.settings.cluster_ports:
                continue
            while next_port in used:
                next_port += 1
            self.settings.cluster_ports[cluster] = next_port
            used.add(next_port)
        for cluster in self.settings.cluster_ports:
            self.settings.passwords.setdefault(
                cluster, {"replication": secrets.token_urlsafe(18), "admin": secrets.token_urlsafe(18)}
            )

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        payload = {"settings": asdict(self.settings), "env": self.environment()}
        self.state_file.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        self.state_file.chmod(0o600)  # holds the local servers' passwords

    # -- servers -----------------------------------------------------------------------------------------------

    def mariadb(self, cluster: str) -> MariaDBServer:
        if cluster not in self.settings.cluster_ports:
            self._assign_cluster_ports()
        passwords = self.settings.passwords[cluster]
        return MariaDBServer(
            cluster=cluster,
            port=self.settings.cluster_ports[cluster],
            root=self.state_dir / "mariadb" / cluster,
            replication_password=passwords["replication"],
            admin_password=passwords["admin"],
        )

    @property
    def moto(self) -> MotoServer:
        return MotoServer(port=self.settings.moto_port, root=self.state_dir / "moto")

    @property
    def bigquery(self) -> BigQueryEmulatorServer:
        return BigQueryEmulatorServer(
            rest_port=self.settings.bigquery_port,
            grpc_port=self.settings.bigquery_grpc_port,
            project=self.settings.bigquery_project,
            root=self.state_dir / "bigquery",
        )

    def clusters(self) -> list[str]:
        return [cluster.cluster for cluster in self.mappings.clusters]

    def up(self) -> list[ServiceStatus]:
        self._assign_cluster_ports()
        self.save()
        for cluster in self.clusters():
            self.mariadb(cluster).start()
        fresh_landing = not self.moto.process.is_running()
        self.moto.start()
        self.moto.configure(self.settings.aws_names)
        self.bigquery.start()
        if fresh_landing:
            self._forget_loaded_data()
        self.save()
        return self.status()

    def _forget_loaded_data(self) -> None:
        """moto keeps no state across restarts: a new landing bucket has no files and no capture checkpoints, so the
        capture starts over with a full load of every table. The local BigQuery tables are dropped with it - kept,
        they would hold rows whose deletes were in the lost files (and append-only rows twice)."""
        client = bigquery_client(self.settings.bigquery_project, endpoint=self.bigquery.endpoint)
        for dataset in client.list_datasets():
            client.delete_dataset(dataset.dataset_id, delete_contents=True, not_found_ok=True)

    def down(self) -> list[str]:
        stopped = []
        servers: list[Any] = [self.bigquery, self.moto]
        servers += [self.mariadb(cluster) for cluster in self.settings.cluster_ports]
        for server in servers:
            if server.stop():
                stopped.append(server.process.name)
        return stopped

    def status(self) -> list[ServiceStatus]:
        statuses = [
            ServiceStatus(f"mariadb[{c}]", self.settings.cluster_ports.get(c, 0), self.mariadb(c).health())
            for c in self.clusters()
        ]
        statuses.append(
            ServiceStatus("moto (S3+SQS)", self.settings.moto_port, self.moto.health(self.settings.aws_names))
        )
        statuses.append(
            ServiceStatus("bigquery (bqemulator)", self.settings.bigquery_port, self.bigquery.health())
        )
        return statuses

    # -- configuration -----------------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """Every variable the platform reads, with this stack's values."""
        s = self.settings
        endpoint = f"http://127.0.0.1:{s.moto_port}"
        values = {
            env_names.STATE_DIR: str(self.state_dir),
            env_names.MAPPINGS_DIR: str(self.mappings.directory),
            env_names.AWS_ENDPOINT_URL: endpoint,
            env_names.AWS_REGION: REGION,
            env_names.AWS_ACCESS_KEY_ID: ACCESS_KEY,
            env_names.AWS_SECRET_ACCESS_KEY: SECRET_KEY,
            env_names.LANDING_BUCKET: s.bucket,
            env_names.LANDING_PREFIX: s.prefix,
            env_names.SQS_QUEUE_URL: f"{endpoint}/123456789012/{s.queue}",
            env_names.SQS_DLQ_URL: f"{endpoint}/123456789012/{s.dead_letter_queue}",
            env_names.BIGQUERY_PROJECT: s.bigquery_project,
            env_names.BIGQUERY_ENDPOINT: f"http://127.0.0.1:{s.bigquery_port}",
            env_names.BIGQUERY_WRITE_ENDPOINT: f"127.0.0.1:{s.bigquery_grpc_port}",
            env_names.BIGQUERY_LOCATION: "US",
        }
        for cluster in self.mappings.clusters:
            if cluster.cluster not in s.cluster_ports:
                continue
            connection = cluster.connection
            values[connection.host_env] = "127.0.0.1"
            values[connection.port_env] = str(s.cluster_ports[cluster.cluster])
            values[connection.user_env] = REPLICATION_USER
            values[connection.password_env] = s.passwords[cluster.cluster]["replication"]
            if connection.tls_env:  # the capture and MariaDB share this host (the local MariaDB has no TLS)
                values[connection.tls_env] = "disabled"
        return values

    def admin_credentials(self, cluster: str) -> tuple[str, str]:
        """The local admin account the demo workload writes with (exists only on the local stack)."""
        return ADMIN_USER, self.settings.passwords[cluster]["admin"]
