"""The demo source: 3 casino games x 2 clusters (accounts, play) = 6 clusters, 70 tables, shaped like the seed.

Column types are the ones real game schemas have and that binlog readers and DMS get wrong: BIGINT UNSIGNED ids,
BIT(1) and TINYINT(1) flags, DECIMAL money, DATETIME(6) and TIMESTAMP, JSON, ENUM/SET, VARBINARY, utf8mb4 text,
TIME, YEAR (the zero year too), zero dates, UTF-16 text and a DECIMAL(38,10) that needs BIGNUMERIC. The shipped
mappings in `mappings/` map exactly these tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GAMES = ("slots", "poker", "roulette")
CREATED = "created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"
UPDATED = "updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)"
ID = "id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT"
PLAYER = "player_id BIGINT UNSIGNED NOT NULL"
MONEY = "DECIMAL(18,4) NOT NULL DEFAULT 0"
CURRENCIES = "ENUM('EUR','USD','KRW','GBP','BTC')"


@dataclass(frozen=True)
class DemoTable:
    name: str
    columns: tuple[str, ...]  # MySQL column definitions, "name TYPE ..."
    primary_key: tuple[str, ...] = ("id",)
    append_only: bool = False
    partition_column: str | None = "created_at"
    type_overrides: dict[str, str] = field(default_factory=dict)
    weight: int = 1  # share of the workload's changes

    def ddl(self, schema: str) -> str:
        body = ",\n  ".join((*self.columns, f"PRIMARY KEY ({', '.join(self.primary_key)})"))
        return (
            f"CREATE TABLE IF NOT EXISTS `{schema}`.`{self.name}` (\n  {body}\n) "
            "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
        )

    @property
    def column_names(self) -> list[str]:
        return [definition.split()[0] for definition in self.columns]


def _t(name: str, *columns: str, **options: object) -> DemoTable:
    return DemoTable(name, columns, **options)  # type: ignore[arg-type]


ACCOUNTS_TABLES: tuple[DemoTable, ...] = (
    _t(
        "players",
        ID,
        "username VARCHAR(64) NOT NULL",
        "email VARCHAR(255) NULL",
        "country CHAR(2) NOT NULL",
        "status ENUM('active','suspended','closed') NOT NULL DEFAULT 'active'",
        "is_vip TINYINT(1) NOT NULL DEFAULT 0",
        "kyc_verified BIT(1) NOT NULL DEFAULT b'0'",
        "marketing_opt_in SET('email','sms','push') NOT NULL DEFAULT ''",
        "balance_cache DECIMAL(18,4) NULL",
        "birth_date DATE NULL",
        CREATED,
        UPDATED,
        type_overrides={"is_vip": "BOOL"},
        weight=3,
    ),
    _t(
        "player_profiles",
        PLAYER,
        "nickname VARCHAR(64) CHARACTER SET utf8mb4 NOT NULL",
        "avatar VARBINARY(64) NULL",
        "preferences JSON NULL",
        "language VARCHAR(8) NOT NULL DEFAULT 'en'",
        "time_zone VARCHAR(32) NULL",
        CREATED,
        UPDATED,
        primary_key=("player_id",),
        weight=2,
    ),
    _t(
        "wallets",
        ID,
        PLAYER,
        f"currency {CURRENCIES} NOT NULL",
        "balance DECIMAL(20,6) NOT NULL DEFAULT 0",
        "bonus_balance DECIMAL(20,6) NOT NULL DEFAULT 0",
        "locked BIT(1) NOT NULL DEFAULT b'0'",
        "version INT UNSIGNED NOT NULL DEFAULT 0",
        CREATED,
        UPDATED,
        weight=4,
    ),
    _t(
        "wallet_transactions",
        ID,
        "wallet_id BIGINT UNSIGNED NOT NULL",
        "kind ENUM('deposit','withdrawal','bet','win','bonus','adjustment') NOT NULL",
        f"amount {MONEY}",
        f"balance_after {MONEY}",
        "reference VARCHAR(64) NULL",
        "meta JSON NULL",
        CREATED,
        weight=6,
    ),
    _t(
        "payments",
        ID,
        PLAYER,
        "provider VARCHAR(32) NOT NULL",
        "method ENUM('card','bank','ewallet','crypto') NOT NULL",
        "amount DECIMAL(18,2) NOT NULL",
        f"currency {CURRENCIES} NOT NULL",
        "status ENUM('pending','settled','failed','refunded') NOT NULL",
        "external_ref VARBINARY(32) NULL",
        "settled_on DATE NULL",
        CREATED,
        UPDATED,
        weight=2,
    ),
    _t(
        "withdrawals",
        ID,
        PLAYER,
        "amount DECIMAL(18,2) NOT NULL",
        "status ENUM('requested','approved','paid','rejected') NOT NULL",
        "requested_at DATETIME(6) NOT NULL",
        "processed_at DATETIME(6) NULL",
        "reviewer_note TEXT NULL",
        CREATED,
        weight=1,
    ),
    _t(
        "bonuses",
        ID,
        "code VARCHAR(32) NOT NULL",
        "title VARCHAR(128) CHARACTER SET utf8mb4 NOT NULL",
        "bonus_type ENUM('deposit_match','free_spins','cashback','no_deposit') NOT NULL",
        "amount DECIMAL(12,2) NOT NULL",
        "wagering_multiplier SMALLINT UNSIGNED NOT NULL DEFAULT 30",
        "active TINYINT(1) NOT NULL DEFAULT 1",
        "valid_from DATE NOT NULL",
        "valid_to DATE NOT NULL DEFAULT '0000-00-00'",
        "rules JSON NULL",
        CREATED,
        UPDATED,
        weight=1,
    ),
    _t(
        "bonus_grants",
        ID,
        "bonus_id BIGINT UNSIGNED NOT NULL",
        PLAYER,
        "granted_amount DECIMAL(12,2) NOT NULL",
        "wagered DECIMAL(14,2) NOT NULL DEFAULT 0",
        "state SET('granted','wagering','completed','expired') NOT NULL",
        "expires_at TIMESTAMP NULL DEFAULT NULL",
        CREATED,
        weight=2,
    ),
    _t(
        "sessions",
        ID,
        PLAYER,
        "device ENUM('ios','android','web') NOT NULL",
        "ip VARBINARY(16) NOT NULL",
        "started_at DATETIME(6) NOT NULL",
        "ended_at DATETIME(6) NULL",
        "idle_time TIME(6) NULL",
        CREATED,
        weight=3,
    ),
    _t(
        "login_events",
        ID,
        PLAYER,
        "success BIT(1) NOT NULL",
        "ip VARBINARY(16) NOT NULL",
        "user_agent VARCHAR(255) NULL",
        CREATED,
        append_only=True,
        weight=4,
    ),
    _t(
        "kyc_checks",
        ID,
        PLAYER,
        "provider VARCHAR(32) NOT NULL",
        "status ENUM('pending','passed','failed','manual') NOT NULL",
        "score DOUBLE NULL",
        "document_type ENUM('passport','id_card','driving_licence') NOT NULL",
        "checked_at DATETIME(6) NULL",
        "details JSON NULL",
        CREATED,
        weight=1,
    ),
    _t(
        "vip_levels",
        ID,
        PLAYER,
        "level TINYINT UNSIGNED NOT NULL",
        "points BIGINT UNSIGNED NOT NULL DEFAULT 0",
        "since_year YEAR NOT NULL",
        "perks SET('cashback','manager','events','limits') NOT NULL DEFAULT ''",
        "level_name VARCHAR(32) CHARACTER SET utf16 NULL",
        "lifetime_share DECIMAL(38,10) NULL",
        CREATED,
        UPDATED,
        weight=1,
    ),
)

PLAY_TABLES: tuple[DemoTable, ...] = (
    _t(
        "rounds",
        ID,
        "machine_id INT UNSIGNED NOT NULL",
        "started_at DATETIME(6) NOT NULL",
        "ended_at DATETIME(6) NULL",
        "outcome JSON NULL",
        "rng_seed BIGINT UNSIGNED NOT NULL",
        CREATED,
        UPDATED,
        weight=5,
    ),
    _t(
        "bets",
        ID,
        "round_id BIGINT UNSIGNED NOT NULL",
        PLAYER,
        f"stake {MONEY}",
        f"payout {MONEY}",
        f"currency {CURRENCIES} NOT NULL",
        "status ENUM('open','won','lost','void') NOT NULL",
        "is_bonus_money TINYINT(1) NOT NULL DEFAULT 0",
        "placed_at DATETIME(6) NOT NULL",
        CREATED,
        UPDATED,
        weight=10,
    ),
    _t(
        "spins",
        ID,
        PLAYER,
        "machine_id INT UNSIGNED NOT NULL",
        "bet_amount DECIMAL(12,2) NOT NULL",
        "win_amount DECIMAL(12,2) NOT NULL",
        "reels VARBINARY(16) NOT NULL",
        "feature_flags BIT(8) NOT NULL",
        "spin_duration TIME(3) NOT NULL",
        CREATED,
        weight=8,
    ),
    _t(
        "jackpots",
        ID,
        "name VARCHAR(64) CHARACTER SET utf8mb4 NOT NULL",
        "pool DECIMAL(20,4) NOT NULL",
        "seed_amount DECIMAL(20,4) NOT NULL",
        "is_progressive TINYINT(1) NOT NULL DEFAULT 1",
        "last_won_at DATETIME NOT NULL DEFAULT '0000-00-00 00:00:00'",
        CREATED,
        UPDATED,
        weight=1,
    ),
    _t(
        "jackpot_wins",
        ID,
        "jackpot_id BIGINT UNSIGNED NOT NULL",
        PLAYER,
        "amount DECIMAL(20,4) NOT NULL",
        "won_at DATETIME(6) NOT NULL",
        "paid BIT(1) NOT NULL DEFAULT b'0'",
        CREATED,
        weight=1,
    ),
    _t(
        "game_events",
        ID,
        PLAYER,
        "event_type VARCHAR(32) NOT NULL",
        "payload JSON NULL",
        "client_ts TIMESTAMP(3) NULL DEFAULT NULL",
        CREATED,
        append_only=True,
        weight=8,
    ),
    _t(
        "tournaments",
        ID,
        "name VARCHAR(128) CHARACTER SET utf8mb4 NOT NULL",
        "buy_in DECIMAL(12,2) NOT NULL",
        "prize_pool DECIMAL(16,2) NOT NULL",
        "starts_at DATETIME NOT NULL",
        "ends_at DATETIME NOT NULL",
        "status ENUM('scheduled','running','finished','cancelled') NOT NULL",
        "rules JSON NULL",
        CREATED,
        UPDATED,
        weight=1,
    ),
    _t(
        "tournament_entries",
        ID,
        "tournament_id BIGINT UNSIGNED NOT NULL",
        PLAYER,
        "score BIGINT NOT NULL DEFAULT 0",
        "rank_pos INT UNSIGNED NULL",
        "eliminated TINYINT(1) NOT NULL DEFAULT 0",
        CREATED,
        UPDATED,
        weight=3,
    ),
    _t(
        "leaderboards",
        "board VARCHAR(32) NOT NULL",
        PLAYER,
        "score BIGINT NOT NULL",
        "season YEAR NOT NULL",
        CREATED,
        UPDATED,
        primary_key=("board", "player_id"),
        weight=3,
    ),
    _t(
        "achievements",
        ID,
        PLAYER,
        "code VARCHAR(64) NOT NULL",
        "progress TINYINT UNSIGNED NOT NULL DEFAULT 0",
        "unlocked BIT(1) NOT NULL DEFAULT b'0'",
        "unlocked_at DATETIME(6) NULL",
        CREATED,
        weight=2,
    ),
    _t(
        "missions",
        ID,
        PLAYER,
        "mission_code VARCHAR(64) NOT NULL",
        "target INT NOT NULL",
        "current INT NOT NULL",
        "reward DECIMAL(10,2) NOT NULL",
        "state ENUM('active','done','expired') NOT NULL",
        "expires_on DATE NULL",
        CREATED,
        UPDATED,
        weight=2,
    ),
)

SLOTS_ONLY_TABLES: tuple[DemoTable, ...] = (
    _t(
        "free_spins",
        ID,
        PLAYER,
        "machine_id INT UNSIGNED NOT NULL",
        "spins_left SMALLINT UNSIGNED NOT NULL",
        "granted_by ENUM('bonus','jackpot','mission','support') NOT NULL",
        "expires_at TIMESTAMP NULL DEFAULT NULL",
        CREATED,
        weight=2,
    ),
)


@dataclass(frozen=True)
class DemoCluster:
    name: str
    game: str
    schema: str
    tables: tuple[DemoTable, ...]

    def table(self, name: str) -> DemoTable:
        return next(table for table in self.tables if table.name == name)


def demo_clusters() -> list[DemoCluster]:
    clusters = []
    for game in GAMES:
        clusters.append(DemoCluster(f"{game}_accounts", game, f"{game}_accounts", ACCOUNTS_TABLES))
        play = PLAY_TABLES + (SLOTS_ONLY_TABLES if game == "slots" else ())
        clusters.append(DemoCluster(f"{game}_play", game, f"{game}_play", play))
    return clusters


def mapping_document(cluster: DemoCluster) -> dict[str, object]:
    """The mapping file the demo ships for one cluster (written once to `mappings/`, then edited by people)."""
    prefix = f"CDC_MYSQL_{cluster.name.upper()}"
    tables: list[dict[str, object]] = []
    for table in cluster.tables:
        entry: dict[str, object] = {
            "source": f"{cluster.schema}.{table.name}",
            "target": f"{cluster.game}.{table.name}",
        }
        if table.append_only:
            entry["append_only"] = True
        else:
            entry["primary_key"] = list(table.primary_key)
        if table.partition_column:
            entry["partition_column"] = table.partition_column
        if table.type_overrides:
            entry["type_overrides"] = dict(table.type_overrides)
        tables.append(entry)
    return {
        "$schema": "./mapping.schema.json",
        "cluster": cluster.name,
        "description": f"{cluster.game.title()}: {cluster.name.split('_', 1)[1]} database cluster",
        "connection": {
            "host_env": f"{prefix}_HOST",
            "port_env": f"{prefix}_PORT",
            "user_env": f"{prefix}_USER",
            "password_env": f"{prefix}_PASSWORD",
            "tls_env": f"{prefix}_TLS",
        },
        "tables": tables,
    }
