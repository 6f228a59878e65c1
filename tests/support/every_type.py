"""A table of every column type the capture handles, with the awkward values binlog readers and DMS get wrong:
its DDL, edge rows, and the changes the capture and streaming tests drive through it."""

from __future__ import annotations

from capture.service import ClusterCapture
from cdc.mappings import TableMapping
from tests.support.capture import FAST, CaptureEnv, run_sql, running, wait_caught_up

EVERY_TYPE = """
CREATE TABLE `{schema}`.`every_type` (
  id BIGINT UNSIGNED NOT NULL,
  u64 BIGINT UNSIGNED NULL, i64 BIGINT NULL, i32 INT NULL, u32 INT UNSIGNED NULL, i16 SMALLINT NULL,
  u8 TINYINT UNSIGNED NULL, flag TINYINT(1) NULL, flag_bool TINYINT(1) NULL, m24 MEDIUMINT NULL,
  b1 BIT(1) NULL, b8 BIT(8) NULL, b12 BIT(12) NULL, b64 BIT(64) NULL,
  money DECIMAL(18,4) NULL, wide DECIMAL(65,10) NULL, big DECIMAL(38,10) NULL, d DOUBLE NULL,
  day DATE NULL, dt0 DATETIME NULL, dt6 DATETIME(6) NULL, ts6 TIMESTAMP(6) NULL DEFAULT NULL,
  t0 TIME NULL, t6 TIME(6) NULL, t3 TIME(3) NULL, yr YEAR NULL,
  name VARCHAR(64) CHARACTER SET utf8mb4 NULL, fixed CHAR(3) NULL, body TEXT NULL,
  state ENUM('a','b','c') NULL, opts SET('x','y','z') NULL, opts_nn SET('x','y') NOT NULL DEFAULT '',
  bin VARBINARY(16) NULL, blob_col BLOB NULL, fixed_bin BINARY(4) NULL, doc JSON NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""

EDGE_ROWS = [
    # the awkward values, then NULLs everywhere nullable, then ordinary values
    "(1, 18446744073709551615, -9223372036854775808, -2147483648, 4294967295, -32768, 255, 1, 0, -8388608, "
    "b'1', b'11111111', b'101010101010', b'1111111111111111111111111111111111111111111111111111111111111111', "
    "99999999999999.9999, 12345678901234567890123456789012345678901234567890123.1234567891, "
    "9999999999999999999999999999.9999999999, -1.5e-300, "
    "'0000-00-00', '0000-00-00 00:00:00', '2024-00-00 00:00:00', '1970-01-01 00:00:01.000001', "
    "'-838:59:59', '-00:00:00.000001', '838:59:59.999', 2155, "
    "'🎰 라이언 çà', 'abc', REPEAT('ü', 300), 'c', '', '', '', '', '\\0\\0\\0\\0', "
    '\'{"a": [1, 2, {"b": null}], "emoji": "🎲"}\')',
    "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
    "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'x,y', NULL, NULL, NULL, NULL)",
    "(3, 0, 9223372036854775807, 0, 0, 0, 0, 0, 1, 0, b'0', b'0', b'0', b'0', 0, 0, -0.0000000001, 0, "
    "'2026-11-25', '2026-11-25 23:59:59', '2026-11-25 01:02:03.000004', '2038-01-19 03:14:07.999999', "
    "'00:00:00', '23:59:59.000001', '-00:00:00.5', 0, '', '', '', 'a', 'x,z', 'y', X'00FF', X'', X'01020304', "
    "'[]')",
]


def create_every_type(env: CaptureEnv) -> None:
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute("SET SESSION sql_mode = 'NO_ENGINE_SUBSTITUTION'")
        cursor.execute(EVERY_TYPE.format(schema=env.schema))


def insert_every_type(env: CaptureEnv, rows: list[str], offset: int = 0) -> None:
    with env.admin() as connection, connection.cursor() as cursor:
        cursor.execute("SET SESSION sql_mode = 'NO_ENGINE_SUBSTITUTION'")
        for row in rows:
            if offset:
                row = f"({int(row[1 : row.index(',')]) + offset}" + row[row.index(",") :]
            cursor.execute(f"INSERT INTO `{env.schema}`.`every_type` VALUES {row}")


def capture_every_type(env: CaptureEnv, overrides: dict[str, str] | None = None) -> TableMapping:
    """Edge rows through the full load, the same values through the binlog, then updates, a key change, a delete
    and zero dates; captured into the env's landing prefix. The mapping of the table (TINYINT(1) flag_bool as BOOL)."""
    create_every_type(env)
    insert_every_type(env, EDGE_ROWS)  # before the capture: these arrive through the full load
    table = env.table("every_type", ["id"], type_overrides={"flag_bool": "BOOL", **(overrides or {})})
    with running(ClusterCapture(env.mapping(table), env.replication(), env.store(), FAST)):
        wait_caught_up(env)
        insert_every_type(env, EDGE_ROWS, offset=100)  # the same values through the binlog
        run_sql(
            env,
            "UPDATE `{schema}`.every_type SET t6 = '-12:00:00.000001', opts = '', b1 = b'0', money = -0.0001 WHERE id = 3",
            "UPDATE `{schema}`.every_type SET name = '새 이름 🎉', doc = '{{\"k\": 2}}', u64 = 18446744073709551614, yr = 1901 WHERE id = 101",
            "UPDATE `{schema}`.every_type SET id = 1000 WHERE id = 102",  # a primary-key change
            "DELETE FROM `{schema}`.every_type WHERE id = 2",
            "UPDATE `{schema}`.every_type SET dt0 = '0000-00-00 00:00:00', day = '2020-02-00' WHERE id = 103",
        )
        wait_caught_up(env)
    return table
