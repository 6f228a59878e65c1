"""A mapped source table as the capture sees it: its columns (from information_schema, or from the binlog when
the schema has moved on), their normalisers, and a row turned into exact values in column order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capture.columns import ColumnSpec, agrees_with_table_map, spec_from_table_map
from cdc.landing import ADDED_COLUMNS
from cdc.mappings import TableMapping


class CaptureError(RuntimeError):
    """A condition the capture cannot continue from; the message says what to do."""


@dataclass
class SourceTable:
    mapping: TableMapping
    columns: list[ColumnSpec]
    names: list[str] = field(init=False)
    key_indexes: list[int] = field(init=False)
    temporal_indexes: list[int] = field(init=False)
    active: list[tuple[int, str, Callable[[Any, str], Any]]] = field(
        init=False
    )  # normalisers that change values
    signature: tuple[Any, ...] | None = None  # the binlog table map's `table_map_signature`, once seen
    table_map: Any = None  # the columns of the last event's table map (the same object while it holds)

    def __post_init__(self) -> None:
        self.names = [c.name for c in self.columns]
        self.key_indexes = [self.names.index(k) for k in self.mapping.primary_key]
        self.temporal_indexes = [i for i, c in enumerate(self.columns) if c.temporal]
        normalisers = [(i, c.name, c.normaliser()) for i, c in enumerate(self.columns)]
        self.active = [(i, name, n) for i, name, n in normalisers if n is not None]

    def agrees_with(self, event_columns: Any) -> bool:
        """Whether a binlog event's table-map columns are this table's (names and types)."""
        return all(
            agrees_with_table_map(spec, column)
            for spec, column in zip(self.columns, event_columns, strict=True)
        )

    def normalise(self, row: Any, none_sources: dict[str, str] | None) -> tuple[list[Any], int]:
        """(exact values in column order, zero dates among them) from a binlog row (dict) or a snapshot row
        (tuple). The reader says why it returned None in ``none_sources`` (NULL, empty SET, out-of-range date)."""
        values = [row.get(name) for name in self.names] if isinstance(row, dict) else list(row)
        sources = none_sources or {}
        zero_dates = 0
        for index in self.temporal_indexes:
            raw = values[index]
            if self.columns[index].zero_date(raw, sources.get(self.names[index], "") if raw is None else ""):
                zero_dates += 1
        for index, name, normalise in self.active:
            raw = values[index]
            values[index] = normalise(raw, sources.get(name, "") if raw is None else "")
        return values, zero_dates


def read_columns(connection: Any, table: TableMapping, cluster: str) -> list[ColumnSpec]:
    """The table's columns from information_schema, checked against the mapping (CaptureError naming what)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT COLUMN_NAME, LOWER(COLUMN_TYPE), IS_NULLABLE = 'YES' FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (table.source_schema, table.source_table),
        )
        rows = cursor.fetchall()
    if not rows:
        raise CaptureError(
            f"cluster {cluster}: mapped table {table.source} does not exist at the source; "
            "create it or fix the mapping (cdc mappings validate checks the file, not the source)"
        )
    specs = [
        ColumnSpec(
            name=name, column_type=ctype, nullable=bool(nullable), override=table.type_overrides.get(name)
        )
        for name, ctype, nullable in rows
    ]
    check_columns(table, specs)
    return specs


def check_columns(table: TableMapping, specs: list[ColumnSpec]) -> None:
    names = {spec.name for spec in specs}
    clash = names & set(ADDED_COLUMNS)
    if clash:
        raise CaptureError(
            f"{table.source}: column(s) {sorted(clash)} collide with the columns the capture adds"
        )
    for column in (*table.primary_key, *table.type_overrides):
        if column not in names:
            raise CaptureError(f"{table.source}: mapped column {column!r} does not exist at the source")
    for spec in specs:
        spec.arrow_type()  # raises UnsupportedColumn naming the column


def columns_of_event(
    mapping: TableMapping, current: dict[str, ColumnSpec], event_columns: Any
) -> list[ColumnSpec]:
    """The columns a binlog rows event was written with: today's definition where the column still exists with the
    type the event was logged with, otherwise one synthesised from the event's table map (the schema has moved on
    since: a capture behind the source reads rows logged before an ALTER after it)."""
    specs = []
    for column in event_columns:
        spec = current.get(column.name)
        if spec is None or not agrees_with_table_map(spec, column):
            spec = spec_from_table_map(column, nullable=spec.nullable if spec else True)
        override = mapping.type_overrides.get(column.name)
        if override and spec.override is None:
            spec = ColumnSpec(spec.name, spec.column_type, spec.nullable, override)
        specs.append(spec)
    return specs
