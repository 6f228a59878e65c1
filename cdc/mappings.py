"""Table mappings: the one file per cluster that analysts edit to add a table.

Owns the pydantic models (the single definition of a mapping), loading every ``*.json`` file of the mappings
folder, and validation that names the file, the table and the field of every problem. The JSON Schema that
editors use (``mappings/mapping.schema.json``) is generated from these models by ``cdc mappings schema``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from cdc import settings

SCHEMA_FILE_NAME = "mapping.schema.json"
CHANGELOG_SUFFIX = "_changelog"

# MySQL identifiers we accept: letters, digits and underscore, not starting with a digit, at most 64 chars.
# Stricter than MySQL itself on purpose: every name is later quoted into SQL on two systems.
MYSQL_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
# BigQuery dataset and table names we accept (a safe subset of what BigQuery allows).
BIGQUERY_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]{0,1023}"
ENV_VAR_NAME = r"[A-Z_][A-Z0-9_]*"

MysqlIdentifier = Annotated[str, StringConstraints(pattern=rf"^{MYSQL_IDENTIFIER}$")]
ClusterName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
EnvVarName = Annotated[str, StringConstraints(pattern=rf"^{ENV_VAR_NAME}$")]

# BigQuery column types a mapping may force a source column to (e.g. TINYINT(1) -> BOOL).
BIGQUERY_TYPES = (
    "BOOL",
    "INT64",
    "NUMERIC",
    "BIGNUMERIC",
    "FLOAT64",
    "STRING",
    "BYTES",
    "DATE",
    "DATETIME",
    "TIME",
    "TIMESTAMP",
    "JSON",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Connection(_Strict):
    """Names of the environment variables that hold a cluster's connection. Never the values themselves."""

    host_env: EnvVarName
    port_env: EnvVarName
    user_env: EnvVarName
    password_env: EnvVarName
    tls_env: EnvVarName | None = Field(
        default=None,
        description="Variable holding the connection's TLS mode: `required` (encrypted, or the connection fails), "
        "`preferred` (encrypted when the server offers TLS; the default, also when the variable is unset or not "
        "named) or `disabled` (plain TCP: only for a source on the same host or a private network - it saves the "
        "capture's encryption CPU).",
    )


class TableMapping(_Strict):
    """One source table and where it lands in BigQuery."""

    source: Annotated[
        str,
        StringConstraints(pattern=rf"^{MYSQL_IDENTIFIER}\.{MYSQL_IDENTIFIER}$"),
        Field(description="Source table as schema.table in the cluster's MySQL server."),
    ]
    target: Annotated[
        str,
        StringConstraints(pattern=rf"^{BIGQUERY_IDENTIFIER}\.{BIGQUERY_IDENTIFIER}$"),
        Field(
            description="BigQuery dataset.table of the current-state table; the changelog lands beside it "
            f"as dataset.table{CHANGELOG_SUFFIX}."
        ),
    ]
    primary_key: list[MysqlIdentifier] = Field(
        default_factory=list, description="Primary key columns; required unless append_only is true."
    )
    append_only: bool = Field(
        default=False, description="The table only ever receives inserts (e.g. an event log); no key needed."
    )
    partition_column: MysqlIdentifier | None = Field(
        default=None, description="A DATE/DATETIME/TIMESTAMP column used by the per-day row-count checks."
    )
    type_overrides: dict[MysqlIdentifier, str] = Field(
        default_factory=dict,
        description="Column -> BigQuery type, for types the source cannot express (e.g. TINYINT(1) -> BOOL).",
        json_schema_extra={"additionalProperties": {"enum": list(BIGQUERY_TYPES)}},
    )
    enabled: bool = Field(default=True, description="Disabled tables stay in the file but are not captured.")
    load_mode: Literal["streaming", "batch"] | None = Field(
        default=None,
        description="streaming: Storage Write API + BigQuery's native CDC, seconds behind the source; batch: a "
        "load job + MERGE per batch (at most ~1 load a minute per table under BigQuery's quota). Default: "
        "CDC_LOAD_MODE (streaming).",
    )
    max_staleness_minutes: Annotated[float, Field(ge=0, le=1440)] | None = Field(
        default=None,
        description="Streaming mode: the current-state table's max_staleness. 0 or unset: a query always sees "
        "every change applied (it merges pending changes itself); more lets queries read the last background "
        "apply, cheaper but up to that many minutes old. Default: CDC_MAX_STALENESS_MINUTES.",
    )

    @model_validator(mode="after")
    def _check(self) -> TableMapping:
        if not self.append_only and not self.primary_key:
            raise ValueError("primary_key: required unless append_only is true")
        if len(set(self.primary_key)) != len(self.primary_key):
            raise ValueError(f"primary_key: a column is listed twice in {self.primary_key}")
        if self.target.endswith(CHANGELOG_SUFFIX):
            raise ValueError(
                f"target: must not end with '{CHANGELOG_SUFFIX}' (that name is reserved for changelog tables)"
            )
        for column, bq_type in self.type_overrides.items():
            if bq_type not in BIGQUERY_TYPES:
                raise ValueError(
                    f"type_overrides.{column}: unknown BigQuery type {bq_type!r}; "
                    f"use one of {', '.join(BIGQUERY_TYPES)}"
                )
        return self

    @property
    def source_schema(self) -> str:
        return self.source.split(".", 1)[0]

    @property
    def source_table(self) -> str:
        return self.source.split(".", 1)[1]

    @property
    def target_dataset(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def target_table(self) -> str:
        return self.target.split(".", 1)[1]

    @property
    def changelog_table(self) -> str:
        return self.target_table + CHANGELOG_SUFFIX


class ClusterMapping(_Strict):
    """One MySQL cluster (one server and binlog) and the tables captured from it."""

    schema_: str | None = Field(default=None, alias="$schema", description="Editor hint; ignored.")
    cluster: ClusterName = Field(description="Cluster name: lowercase letters, digits and underscores.")
    description: str = ""
    connection: Connection
    tables: list[TableMapping]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def enabled_tables(self) -> list[TableMapping]:
        return [table for table in self.tables if table.enabled]


@dataclass(frozen=True)
class MappingProblem:
    """One thing wrong with a mapping file, located as precisely as we can."""

    file: Path
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}" if self.where else f"{self.file}: {self.message}"


class MappingError(Exception):
    """Raised when mappings do not validate; carries every problem found, not just the first."""

    def __init__(self, problems: list[MappingProblem]):
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(
            f"{len(problems)} problem(s) in the table mappings:\n{lines}\n"
            "Fix the named fields and run `cdc mappings validate` again."
        )


@dataclass(frozen=True)
class Mappings:
    """Every cluster's mapping, loaded and cross-checked."""

    directory: Path
    clusters: tuple[ClusterMapping, ...]

    def cluster(self, name: str) -> ClusterMapping:
        for cluster in self.clusters:
            if cluster.cluster == name:
                return cluster
        known = ", ".join(c.cluster for c in self.clusters)
        raise KeyError(f"unknown cluster {name!r}; the mappings in {self.directory} define: {known}")

    def tables(self, *, enabled_only: bool = True) -> Iterator[tuple[ClusterMapping, TableMapping]]:
        for cluster in self.clusters:
            for table in cluster.enabled_tables if enabled_only else cluster.tables:
                yield cluster, table


def _where(loc: tuple[int | str, ...], data: Any) -> str:
    """Render a pydantic error location, naming the table by its source where the location is inside one."""
    parts: list[str] = []
    node = data
    for index, key in enumerate(loc):
        if isinstance(key, int):
            label = f"[{key}]"
            if parts == ["tables"] and isinstance(node, list) and key < len(node):
                source = node[key].get("source") if isinstance(node[key], dict) else None
                label = f"[{key}] ({source})" if source else label
            parts.append(label)
        else:
            parts.append(("." if index else "") + str(key))
        node = node[key] if isinstance(node, (dict, list)) and _has(node, key) else None  # type: ignore[index]
    return "".join(parts)


def _has(node: dict[Any, Any] | list[Any], key: int | str) -> bool:
    if isinstance(node, list):
        return isinstance(key, int) and 0 <= key < len(node)
    return key in node


def _explain(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "string_pattern_mismatch":
        return f"{error['input']!r} is not a valid identifier here ({error['ctx']['pattern']})"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def parse_file(path: Path) -> tuple[ClusterMapping | None, list[MappingProblem]]:
    """Parse and validate one mapping file on its own."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return None, [
            MappingProblem(path, f"line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}")
        ]
    except OSError as exc:
        return None, [MappingProblem(path, "", f"cannot read: {exc.strerror}")]
    try:
        return ClusterMapping.model_validate(data), []
    except ValidationError as exc:
        problems = [
            MappingProblem(path, _where(tuple(e["loc"]), data), _explain(dict(e))) for e in exc.errors()
        ]
        return None, problems


def _cross_check(parsed: list[tuple[Path, ClusterMapping]]) -> list[MappingProblem]:
    """Problems that only show across tables or files: duplicate clusters, sources and targets."""
    problems: list[MappingProblem] = []
    clusters: dict[str, Path] = {}
    targets: dict[str, str] = {}
    for path, cluster in parsed:
        if cluster.cluster in clusters:
            problems.append(
                MappingProblem(
                    path, "cluster", f"{cluster.cluster!r} is also defined in {clusters[cluster.cluster]}"
                )
            )
        clusters[cluster.cluster] = path
        sources: set[str] = set()
        for index, table in enumerate(cluster.tables):
            where = f"tables[{index}] ({table.source})"
            if table.source in sources:
                problems.append(MappingProblem(path, f"{where}.source", "this source table is mapped twice"))
            sources.add(table.source)
            key = table.target.lower()  # BigQuery table names are case-insensitive within a dataset for us
            here = f"{path}: {where}"
            if key in targets:
                problems.append(
                    MappingProblem(
                        path, f"{where}.target", f"{table.target!r} is also the target of {targets[key]}"
                    )
                )
            targets[key] = here
            if table.partition_column is not None and table.partition_column in table.type_overrides:
                problems.append(
                    MappingProblem(
                        path, f"{where}.partition_column", "the partition column must keep its source type"
                    )
                )
    return problems


def mapping_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.json") if p.name != SCHEMA_FILE_NAME)


def load_mappings(directory: Path | None = None) -> Mappings:
    """Load and validate every mapping file; raise :class:`MappingError` listing every problem found."""
    directory = directory or settings.mappings_dir()
    if not directory.is_dir():
        raise MappingError(
            [MappingProblem(directory, "", "mappings folder does not exist (see CDC_MAPPINGS_DIR)")]
        )
    files = mapping_files(directory)
    if not files:
        raise MappingError([MappingProblem(directory, "", "no *.json mapping files in this folder")])
    parsed: list[tuple[Path, ClusterMapping]] = []
    problems: list[MappingProblem] = []
    for path in files:
        cluster, file_problems = parse_file(path)
        problems.extend(file_problems)
        if cluster is not None:
            parsed.append((path, cluster))
    problems.extend(_cross_check(parsed))
    if problems:
        raise MappingError(problems)
    return Mappings(directory=directory, clusters=tuple(cluster for _, cluster in parsed))


def deploy_mappings(source: Path, target: Path) -> Mappings:
    """Validate every mapping file in `source` and publish them at `target`, which the running capture and Dagster
    read: a symlink swapped atomically to a complete copy, so they only ever see a whole, valid set. A folder with
    any problem raises MappingError and changes nothing."""
    load_mappings(source)
    files = mapping_files(source)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    target.parent.mkdir(parents=True, exist_ok=True)
    version = target.parent / f"{target.name}.{digest.hexdigest()[:12]}"
    if not version.is_dir():
        staging = target.parent / f".{version.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for path in files:
            shutil.copy2(path, staging / path.name)
        os.replace(staging, version)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # a plain folder from before: replaced by the link
    link = target.parent / f".{target.name}.link"
    link.unlink(missing_ok=True)
    link.symlink_to(version.name)
    os.replace(link, target)
    for old in target.parent.glob(f"{target.name}.*"):  # earlier versions (a run may still read a recent one)
        if old != version and old.is_dir() and time.time() - old.stat().st_mtime > 86_400:
            shutil.rmtree(old, ignore_errors=True)
    return load_mappings(target)


def json_schema() -> dict[str, Any]:
    schema = ClusterMapping.model_json_schema(by_alias=True)
    schema["title"] = "CDC cluster mapping"
    schema["$id"] = SCHEMA_FILE_NAME
    return schema


def write_json_schema(directory: Path) -> Path:
    path = directory / SCHEMA_FILE_NAME
    path.write_text(json.dumps(json_schema(), indent=2) + "\n", encoding="utf-8")
    return path


def quote_mysql(identifier: str) -> str:
    """Quote a validated MySQL identifier with backticks (refuses anything the mapping rules would refuse)."""
    if not re.fullmatch(MYSQL_IDENTIFIER, identifier):
        raise ValueError(f"refusing to quote unsafe MySQL identifier {identifier!r}")
    return f"`{identifier}`"


def quote_bigquery(*parts: str) -> str:
    """Quote a validated BigQuery path (project, dataset, table) with backticks."""
    for part in parts:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,1024}", part):
            raise ValueError(f"refusing to quote unsafe BigQuery identifier {part!r}")
    return "`" + ".".join(parts) + "`"
