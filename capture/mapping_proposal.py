"""A table's mapping entry proposed from the source's information_schema (`cdc mappings add`): its primary key (or
`append_only` with a warning when it has none), a `partition_column` from a creation-time column, type overrides
proposed (TINYINT(1) -> BOOL) but written only when accepted, and every column the capture cannot represent named
with the fix. How a mapping is read: docs/design.md, "Mappings"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from capture.columns import ColumnSpec, UnsupportedColumn

CREATION_NAMES = (
    "created_at",
    "created",
    "created_on",
    "create_time",
    "creation_time",
    "creation_date",
    "date_created",
    "inserted_at",
    "registered_at",
)
TEMPORAL = ("date", "datetime", "timestamp")


class ProposalError(RuntimeError):
    """The table cannot be mapped as it is; the message names the table or column and what to do."""


@dataclass
class Proposal:
    entry: dict[str, Any]  # the table's mapping entry, as written to the cluster's file
    overrides: dict[str, str] = field(
        default_factory=dict
    )  # proposed type overrides: column -> BigQuery type
    reasons: dict[str, str] = field(default_factory=dict)  # why each override is proposed
    warnings: list[str] = field(default_factory=list)


def propose_table(connection: Any, source: str, target: str) -> Proposal:
    """The mapping entry for `source` (schema.table) landing at `target` (dataset.table), read from the source."""
    schema, table = source.split(".", 1)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT COLUMN_NAME, LOWER(COLUMN_TYPE), LOWER(COALESCE(COLUMN_DEFAULT, '')), LOWER(EXTRA) "
            "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (schema, table),
        )
        columns = [(str(n), str(t), str(d), str(e)) for n, t, d, e in cursor.fetchall()]
        if not columns:
            raise ProposalError(
                f"{source} does not exist at the source (or the mapping's user cannot see it): check the name "
                f"with SHOW TABLES IN `{schema}`"
            )
        cursor.execute(
            "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s "
            "AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
            (schema, table),
        )
        key = [str(row[0]) for row in cursor.fetchall()]
    problems = []
    for name, column_type, _, _ in columns:
        try:
            ColumnSpec(name, column_type).arrow_type()
        except UnsupportedColumn as exc:
            problems.append(str(exc))
    if problems:
        raise ProposalError(f"{source}: " + "; ".join(problems))

    proposal = Proposal({"source": source, "target": target})
    if key:
        proposal.entry["primary_key"] = key
    else:
        proposal.entry["append_only"] = True
        proposal.warnings.append(
            f"{source} has no primary key: mapped append_only (every change is a row; no current state, updates "
            "and deletes are not applied). If its rows change, add a primary key at the source and map it again."
        )
    partition = _creation_column(columns)
    if partition:
        proposal.entry["partition_column"] = partition
    for name, column_type, _, _ in columns:
        if column_type.startswith("tinyint(1)"):
            proposal.overrides[name] = "BOOL"
            proposal.reasons[name] = (
                "TINYINT(1) is MySQL's boolean; BOOL in BigQuery (any non-zero value -> true)"
            )
    return proposal


def _creation_column(columns: list[tuple[str, str, str, str]]) -> str | None:
    """A DATE/DATETIME/TIMESTAMP column set when the row is created: by name, else by a CURRENT_TIMESTAMP default
    that no update changes."""
    temporal = [c for c in columns if c[1].split("(")[0] in TEMPORAL]
    for name, _, _, _ in temporal:
        if name.lower() in CREATION_NAMES:
            return name
    for name, _, default, extra in temporal:
        if default.startswith(("current_timestamp", "now(")) and "on update" not in extra:
            return name
    return None
