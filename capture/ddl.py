"""The DDL statements the capture acts on, read from the binlog's query events: statements that empty a table
without row events - `TRUNCATE`, `DROP TABLE`, a `RENAME` away (each landed as a TRUNCATE change) - and statements
that fill one without row events - a `RENAME` onto a mapped name (an online schema change's cut-over), an `ALTER
TABLE` adding a column with a default (a re-snapshot is requested). docs/types.md, "Changes without row events"."""

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


_QUALIFIED = rf"{_NAME}(?:\s*\.\s*{_NAME})?"
DROP_STATEMENT = re.compile(
    rf"{_COMMENTS}DROP\s+(?:TEMPORARY\s+)?TABLE\s+(?:IF\s+EXISTS\s+)?(?P<names>{_QUALIFIED}(?:\s*,\s*{_QUALIFIED})*)",
    re.IGNORECASE | re.DOTALL,
)
RENAME_STATEMENT = re.compile(rf"{_COMMENTS}RENAME\s+TABLES?\s+(?P<pairs>.*)$", re.IGNORECASE | re.DOTALL)
ALTER_RENAME = re.compile(
    r"\bRENAME\s+(?:TO\s+|AS\s+)?(?!COLUMN\b|INDEX\b|KEY\b)(?P<name>\S+)", re.IGNORECASE
)
PAIR = re.compile(
    rf"^\s*(?P<old>{_QUALIFIED})\s+TO\s+(?P<new>{_QUALIFIED})\s*;?\s*$", re.IGNORECASE | re.DOTALL
)


def _key(name: str, default_schema: str) -> TableKey:
    parts = re.findall(_NAME, name)
    if len(parts) == 2:
        return _unquote(parts[0]), _unquote(parts[1])
    return default_schema, _unquote(parts[0])


def renames(query: str, default_schema: str) -> list[tuple[TableKey, TableKey]]:
    """(old, new) of every table a `RENAME TABLE a TO b[, c TO d]` or `ALTER TABLE a RENAME [TO] b` moves."""
    match = RENAME_STATEMENT.match(query)
    if match:
        pairs = [PAIR.match(pair) for pair in _clauses(match["pairs"])]
        return [(_key(p["old"], default_schema), _key(p["new"], default_schema)) for p in pairs if p]
    altered = ALTER_STATEMENT.match(query)
    if altered:
        for clause in _clauses(altered["rest"]):
            moved = ALTER_RENAME.match(clause.strip())
            if moved:
                return [(_table(altered, default_schema), _key(moved["name"], default_schema))]
    return []


def emptied_tables(query: str, default_schema: str) -> list[TableKey]:
    """Tables whose rows are all gone from their name after the statement, without row events: TRUNCATE, DROP
    TABLE, a table renamed away (renamed onto: see `refilled_tables`)."""
    truncated = truncated_table(query, default_schema)
    if truncated:
        return [truncated]
    dropped = DROP_STATEMENT.match(query)
    if dropped:
        return [_key(name.strip(), default_schema) for name in _clauses(dropped["names"])]
    return [old for old, _ in renames(query, default_schema)]


def refilled_tables(query: str, default_schema: str) -> list[TableKey]:
    """Tables that hold rows written without row events under their name after the statement: a table renamed
    onto the name (an online schema change's cut-over), or existing rows given a value by an added column."""
    moved = [new for _, new in renames(query, default_schema)]
    added = fills_existing_rows(query, default_schema)
    return moved + ([added] if added else [])


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
