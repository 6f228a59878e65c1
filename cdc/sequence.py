"""Binlog positions and the change sequence derived from them (part of the landing contract: `cdc_change_seq`).

The change sequence models DMS's `$AR_H_CHANGE_SEQ`: 35 digits, strictly increasing in binlog order. Ours is
computed from where the change sits in the binlog - file number (10 digits), end position of its rows event
(15 digits), row index within the event (10 digits) - so a change replayed after a restart carries exactly the
same sequence, and the loader can order and de-duplicate by it. A full load's rows carry the snapshot's binlog
position with their ordinal in primary-key order, which sorts before every change committed after the snapshot.
Within one table, a sequence identifies one change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEQUENCE_DIGITS = 35


@dataclass(frozen=True, order=True)
class BinlogPosition:
    file: str  # e.g. "mysql-bin.000003"
    pos: int  # byte offset (end of the last event that belongs to this position)

    @property
    def file_number(self) -> int:
        match = re.search(r"\.(\d+)$", self.file)
        if not match:
            raise ValueError(f"binlog file name {self.file!r} has no numeric suffix")
        return int(match.group(1))

    def sequence(self, row_index: int = 0) -> str:
        """The 35-digit change sequence of row ``row_index`` of the event ending at this position."""
        if not 0 <= row_index < 10**10:
            raise ValueError(f"row index {row_index} out of range")
        return f"{self.file_number:010d}{self.pos:015d}{row_index:010d}"

    def key(self) -> tuple[int, int]:
        return (self.file_number, self.pos)
