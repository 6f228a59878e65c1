"""The DDL statements the capture acts on, read from the binlog's query events: `TRUNCATE TABLE` (landed as a
change) and `ALTER TABLE` clauses that give existing rows a value without row events (a re-snapshot is requested).
docs/types.md, "Changes without row events"."""

from __future__ import annotations

import re

TableKey = tuple[str, str]

_NAME = r"(?:`(?:[^`]|``)+`|[A-Za-z0-9_$]+)"
_TABLE = rf"(?P<first>{_NAME})(?:\s*\.\s*(?P<second>{_NAME}))?"
_COMMENTS = r"^\s*(?:/\*.*?\*/\s*)*"
TRUNCATE_STATEMENT = re.compile(
    rf"{_COMMENTS}TRUNCATE\s+(?:TABLE\s+)?{_TABLE}\s*;?\s*$", re.IGNORECASE | re.DOTALL
)
ALTER_STATEMENT = re.compile(
    rf"{_COMMENTS}ALTER\s+(?:ONLINE\s+)?(?:IGNORE\s+)?TABLE\s+(?:IF\s+EXISTS\s+)?{_TABLE}(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)
NOT_A_COLUMN = re.compile(
    r"^ADD\s+(?:INDEX|KEY|CONSTRAINT|PRIMARY|UNIQUE|FOREIGN|FULLTEXT|SPATIAL|PARTITION|PERIOD|SYSTEM|CHECK)\b",
    re.IGNORECASE,
)
GIVES_VALUE = re.compile(
    r"\bNOT\s+NULL\b|\bDEFAULT\s+(?!NULL\b)|\bGENERATED\s+ALWAYS\b|\bAS\s*\(|\bAUTO_INCREMENT\b",
    re.IGNORECASE,
)


def _unquote(name: str) -> str:
    return name[1:-1].replace("``", "`") if name.startswith("`") else name


def _table(match: re.Match[str], default_schema: str) -> TableKey:
    if match["second"]:
        return _unquote(match["first"]), _unquote(match["second"])
    return default_schema, _unquote(match["first"])


def truncated_table(query: str, default_schema: str) -> TableKey | None:
    """The (schema, table) a `TRUNCATE [TABLE] [schema.]table` statement empties, else None."""
    match = TRUNCATE_STATEMENT.match(query)
    return _table(match, default_schema) if match else None


def _clauses(text: str) -> list[str]:
    """Top-level comma-separated clauses (commas inside parentheses or quotes do not split)."""
    clauses: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            clauses.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    clauses.append("".join(current).strip())
    return clauses


def fills_existing_rows(query: str, default_schema: str) -> TableKey | None:
    """The table an `ALTER TABLE` statement adds a column to whose existing rows get a value (a non-NULL default,
    NOT NULL's implicit default, a generated or AUTO_INCREMENT column), else None."""
    match = ALTER_STATEMENT.match(query)
    if not match:
        return None
    for clause in _clauses(match["rest"]):
        if clause.upper().startswith("ADD") and not NOT_A_COLUMN.match(clause) and GIVES_VALUE.search(clause):
            return _table(match, default_schema)
    return None
