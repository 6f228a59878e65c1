"""A table map parsed once, not once per transaction: mysql-replication 1.0.17 parses every TABLE_MAP event in
full (a Column per column, the optional metadata, a Table whose constructor walks every column's attribute dict),
and MySQL/MariaDB write one before the rows of each table in each transaction. For small transactions that was
the largest share of the capture's CPU, above decoding the rows (docs/benchmarks.md, the capture's profile).

A table map whose bytes (after the event header: table id, names, column types and metadata) equal the last one
parsed for that table id describes the same table: the event takes that parse's result, and the reader's table
map keeps the same `Table` (its columns are read, never changed, by the rows events). Any difference - a new table
id after DDL, another column, other metadata - is parsed in full, as before. Applied once at import of the
capture; `apply(False)` restores the reader's own parsing.
"""

from __future__ import annotations

from typing import Any

from pymysqlreplication.event import BinLogEvent
from pymysqlreplication.row_event import TableMapEvent

# the OK byte and the 19-byte event header (timestamp, type, server id, size, next position, flags)
HEADER = 20
_parse_in_full = TableMapEvent.__init__


def _payload(from_packet: Any, event_size: int) -> bytes:
    return bytes(from_packet.packet.get_all_data()[HEADER : HEADER + event_size])


def _init(
    self: Any,
    from_packet: Any,
    event_size: int,
    table_map: dict[int, Any],
    ctl_connection: Any,
    **kwargs: Any,
) -> None:
    payload = _payload(from_packet, event_size)
    known = table_map.get(int.from_bytes(payload[:6], "little"))
    parsed = getattr(known, "_cdc_parsed", None)
    if parsed is not None and parsed[0] == payload and not kwargs.get("freeze_schema"):
        BinLogEvent.__init__(self, from_packet, event_size, table_map, ctl_connection, **kwargs)
        # this event's own header and packet stay; the rest is the earlier parse's (the table, its columns, the
        # reader's per-stream options)
        own = vars(self)
        own.update({name: value for name, value in parsed[1].items() if name not in own})
        return
    _parse_in_full(self, from_packet, event_size, table_map, ctl_connection, **kwargs)
    if self._processed and getattr(self, "table_obj", None) is not None:
        self.table_obj._cdc_parsed = (payload, dict(vars(self)))


def apply(enabled: bool = True) -> None:
    TableMapEvent.__init__ = _init if enabled else _parse_in_full  # type: ignore[method-assign]


apply()
