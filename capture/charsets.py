"""Text in every MySQL/MariaDB character set, decoded exactly from the binlog.

The binlog carries a character column's bytes in the column's own character set (the table map's metadata names
it); a SELECT gets the server's conversion to utf8mb4. mysql-replication 1.0.17 decodes with Python's codec of the
same name, which is wrong for several: `utf16` is Python's byte-order-sniffing little-endian codec (MySQL's utf16,
ucs2 and utf32 are big-endian), latin1 is decoded as Python's cp1252 (five bytes MySQL maps to C1 controls raise),
and swe7, dec8, hp8, keybcs2, armscii8 and geostd8 have no Python codec (the reader hands back raw bytes).

So: the Unicode encodings map to the exact Python codec; every single-byte character set decodes through a table
learned from the source server itself (`learn_single_byte_tables`: one conversion of the bytes 0x00-0xFF per
character set, the same conversion a SELECT applies); the multi-byte East Asian sets use Python's codec of the same
standard. See docs/design.md (type fidelity).
"""

from __future__ import annotations

import codecs
import threading
from typing import Any

from pymysqlreplication.row_event import RowsEvent

UNICODE_CODECS = {
    "utf8mb4": "utf-8",
    "utf8mb3": "utf-8",
    "utf8": "utf-8",
    "utf16": "utf-16-be",
    "utf16le": "utf-16-le",
    "ucs2": "utf-16-be",
    "utf32": "utf-32-be",
}
MULTI_BYTE_CODECS = {
    "big5": "big5",
    "cp932": "cp932",
    "sjis": "shift_jis",
    "ujis": "euc_jp",
    "eucjpms": "euc_jp",
    "euckr": "euc_kr",
    "gb2312": "gb2312",
    "gbk": "gbk",
    "gb18030": "gb18030",
}
# Where MySQL's table for a multi-byte set departs from Python's codec of the same standard (found by the character
# set test): MySQL's sjis decodes 0x815F (JIS X 0208 1-32, REVERSE SOLIDUS) as U+005C, Python's as U+FF3C.
MULTI_BYTE_FIXUPS = {"sjis": str.maketrans({"\uff3c": "\\"})}
# mysql-replication names some character sets by its own Python encoding name: back to MySQL's
READER_NAMES = {"utf8": "utf8mb4", "cp1252": "latin1", "koi8_r": "koi8r", "koi8_u": "koi8u"}
CODEC_PREFIX = "cdc_mysql_"

_tables: dict[str, str] = {}  # single-byte character set -> its 256 characters, learned from the source
_lock = threading.Lock()


def learn_single_byte_tables(connection: Any) -> None:
    """Learn the decoding table of every single-byte character set the server offers (once per process)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT CHARACTER_SET_NAME FROM information_schema.CHARACTER_SETS WHERE MAXLEN = 1")
        names = sorted(str(row[0]) for row in cursor.fetchall() if row[0] != "binary")
        missing = [name for name in names if name not in _tables]
        for name in missing:
            # the name comes from the server's own catalogue and is a bare identifier
            cursor.execute(
                f"SELECT CONVERT(CAST(%s AS CHAR CHARACTER SET {name}) USING utf8mb4)", (bytes(range(256)),)
            )
            (text,) = cursor.fetchone()
            if isinstance(text, str) and len(text) == 256:
                with _lock:
                    _tables[name] = text


def python_codec(reader_name: str | None) -> str | None:
    """The exact Python codec for a character set as the binlog reader names it (None: utf-8 by the reader)."""
    if reader_name is None:
        return None
    name = READER_NAMES.get(reader_name, reader_name)
    if name in _tables or name in MULTI_BYTE_FIXUPS:
        return CODEC_PREFIX + name
    return UNICODE_CODECS.get(name) or MULTI_BYTE_CODECS.get(name) or name


def _search(codec_name: str) -> codecs.CodecInfo | None:
    if not codec_name.startswith(CODEC_PREFIX):
        return None
    name = codec_name[len(CODEC_PREFIX) :]
    if name in MULTI_BYTE_FIXUPS:
        return _fixed_up(codec_name, codecs.lookup(MULTI_BYTE_CODECS[name]), MULTI_BYTE_FIXUPS[name])
    table = _tables.get(name)
    if table is None:
        return None
    encoding_map = codecs.charmap_build(table)

    def decode(data: Any, errors: str = "strict") -> tuple[str, int]:
        return codecs.charmap_decode(data, errors, table)

    def encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
        return codecs.charmap_encode(text, errors, encoding_map)

    return codecs.CodecInfo(encode, decode, name=codec_name)


def _fixed_up(codec_name: str, base: codecs.CodecInfo, fixups: dict[int, str]) -> codecs.CodecInfo:
    def decode(data: Any, errors: str = "strict") -> tuple[str, int]:
        text, consumed = base.decode(data, errors)
        return text.translate(fixups), consumed

    return codecs.CodecInfo(base.encode, decode, name=codec_name)


def apply() -> None:
    """Route the reader's string decoding through `python_codec`."""
    codecs.register(_search)
    RowsEvent.charset_to_encoding = staticmethod(python_codec)  # type: ignore[method-assign, assignment]


apply()
