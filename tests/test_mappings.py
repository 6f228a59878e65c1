"""Table mappings: the shipped ones validate; every kind of wrong file gets a precise error and exit 1."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cdc.mappings import SCHEMA_FILE_NAME, json_schema, load_mappings, quote_bigquery, quote_mysql
from cdc.settings import MAPPINGS_DIR, STATE_DIR
from cli import main
from cli.common import platform_mappings
from local_stack.demo_schema import demo_clusters
from local_stack.stack import LocalStack
from tests.support.capture import new_env, run_sql

SHIPPED = Path(__file__).resolve().parent.parent / "mappings"


def test_shipped_mappings_validate_and_cover_the_demo_schema() -> None:
    mappings = load_mappings(SHIPPED)
    assert len(mappings.clusters) == 6
    assert sum(len(c.tables) for c in mappings.clusters) == 70
    demo = {c.name: c for c in demo_clusters()}
    for cluster, table in mappings.tables():
        source = demo[cluster.cluster].table(table.source_table)
        assert demo[cluster.cluster].schema == table.source_schema
        assert table.append_only == source.append_only
        if not table.append_only:
            assert tuple(table.primary_key) == source.primary_key
        for column in (*table.primary_key, *table.type_overrides, table.partition_column):
            assert column is None or column in source.column_names, (table.source, column)


def test_the_editor_json_schema_is_generated_from_the_models() -> None:
    assert json.loads((SHIPPED / SCHEMA_FILE_NAME).read_text()) == json_schema(), (
        "mappings/mapping.schema.json is stale: run `cdc mappings schema --write`"
    )


def _folder(tmp_path: Path, *documents: dict[str, Any]) -> Path:
    for document in documents:
        (tmp_path / f"{document['cluster']}.json").write_text(json.dumps(document))
    return tmp_path


def _valid() -> dict[str, Any]:
    return json.loads((SHIPPED / "slots_accounts.json").read_text())


def _validate(folder: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["mappings", "validate", str(folder)])
    return result.exit_code, result.output


def test_validate_accepts_a_good_folder(tmp_path: Path) -> None:
    code, output = _validate(_folder(tmp_path, _valid()))
    assert code == 0 and "valid" in output


def _with_table_change(change: dict[str, Any], index: int = 1, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    document = _valid()
    document["tables"][index].update(change)
    for key in drop:
        document["tables"][index].pop(key)
    return document


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            _with_table_change({"primry_key": ["id"]}),
            ["slots_accounts.json", "tables[1] (slots_accounts.player_profiles).primry_key", "unknown key"],
        ),
        (
            _with_table_change({"source": "slots_accounts.bets; DROP TABLE x"}),
            ["tables[1] (slots_accounts.bets; DROP TABLE x).source", "not a valid identifier"],
        ),
        (
            _with_table_change({"target": "slots.players`--"}),
            ["tables[1] (slots_accounts.player_profiles).target", "not a valid identifier"],
        ),
        (
            _with_table_change({}, drop=("primary_key",)),
            [
                "tables[1] (slots_accounts.player_profiles)",
                "primary_key: required unless append_only is true",
            ],
        ),
        (
            _with_table_change({"type_overrides": {"language": "BOOLEANISH"}}),
            ["tables[1] (slots_accounts.player_profiles)", "unknown BigQuery type 'BOOLEANISH'"],
        ),
        (
            _with_table_change({"primary_key": ["id`; --"]}),
            ["tables[1] (slots_accounts.player_profiles).primary_key[0]", "not a valid identifier"],
        ),
        (
            _with_table_change({"target": "slots.players"}),
            ["tables[1] (slots_accounts.player_profiles).target", "'slots.players' is also the target of"],
        ),
        (
            _with_table_change({"source": "slots_accounts.players"}),
            ["tables[1] (slots_accounts.players).source", "mapped twice"],
        ),
        (
            _with_table_change({"target": "slots.players_changelog"}),
            ["tables[1] (slots_accounts.player_profiles)", "reserved for changelog tables"],
        ),
        (
            {**_valid(), "connection": {**_valid()["connection"], "password_env": "hunter2 secret"}},
            ["connection.password_env", "not a valid identifier"],
        ),
        ({**_valid(), "cluster": "Slots-Accounts"}, ["cluster", "not a valid identifier"]),
        ({k: v for k, v in _valid().items() if k != "tables"}, ["tables", "required field is missing"]),
    ],
    ids=[
        "unknown-key",
        "sql-injection-in-source",
        "backtick-in-target",
        "missing-primary-key",
        "unknown-type-override",
        "hostile-primary-key-column",
        "duplicate-target",
        "duplicate-source",
        "reserved-changelog-name",
        "secret-instead-of-env-var-name",
        "bad-cluster-name",
        "missing-tables",
    ],
)
def test_validate_names_file_table_and_field(
    tmp_path: Path, document: dict[str, Any], expected: list[str]
) -> None:
    code, output = _validate(_folder(tmp_path, document))
    assert code == 1
    for fragment in expected:
        assert fragment in output


def test_problems_across_files_are_all_reported(tmp_path: Path) -> None:
    other = copy.deepcopy(_valid())
    other["tables"][0]["source"] = "slots_accounts.other"  # same target as the first file's players
    (tmp_path / "a.json").write_text(json.dumps(_valid()))
    (tmp_path / "b.json").write_text(json.dumps(other))
    (tmp_path / "c.json").write_text('{"cluster": "broken",\n  "tables": [}')
    code, output = _validate(tmp_path)
    assert code == 1
    assert "c.json: line 2 column 14: invalid JSON" in output
    assert "b.json: cluster: 'slots_accounts' is also defined in" in output
    assert "'slots.players' is also the target of" in output


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    code, output = _validate(tmp_path)
    assert code == 1 and "no *.json mapping files" in output


def test_cdc_mappings_dir_points_the_platform_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = _valid()
    document["tables"] = document["tables"][:2]
    _folder(tmp_path, document)
    monkeypatch.setenv(MAPPINGS_DIR, str(tmp_path))
    result = CliRunner().invoke(main, ["mappings", "validate"])
    assert result.exit_code == 0 and "1 clusters, 2 tables" in result.output
    assert load_mappings().directory == tmp_path


@pytest.mark.parametrize("name", ["a`b", "a;b", "a'b", "a b", "", "a.b", "x\\"])
def test_quoting_refuses_unsafe_identifiers(name: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        quote_mysql(name)
    with pytest.raises(ValueError, match="unsafe"):
        quote_bigquery("project", name or "`")


def test_mysql_quoting_refuses_names_mysql_would_truncate_or_misread() -> None:
    for name in ("1abc", "a" * 65):
        with pytest.raises(ValueError, match="unsafe"):
            quote_mysql(name)


def test_quoting_safe_identifiers() -> None:
    assert quote_mysql("player_id") == "`player_id`"
    assert quote_bigquery("local-cdc", "slots", "bets") == "`local-cdc.slots.bets`"


def test_commands_that_report_on_the_platform_read_the_deployed_mappings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table deployed from another folder (`cdc mappings deploy FOLDER`) is known to `cdc status` and the other
    commands about the running platform; before any deploy they read the working folder."""
    working, other = tmp_path / "working", tmp_path / "other"
    working.mkdir()
    other.mkdir()
    document = _valid()
    _folder(working, {**document, "tables": document["tables"][:1]})
    _folder(other, {**document, "tables": document["tables"][1:2]})
    monkeypatch.setenv(MAPPINGS_DIR, str(working))
    monkeypatch.setenv(STATE_DIR, str(tmp_path / "state"))
    only_working, only_other = document["tables"][0]["target"], document["tables"][1]["target"]
    assert [t.target for _, t in platform_mappings().tables()] == [only_working]
    unknown = CliRunner().invoke(main, ["status", "--table", only_other])
    assert unknown.exit_code == 1 and f"no mapped table is named {only_other!r}" in unknown.output
    assert CliRunner().invoke(main, ["mappings", "deploy", str(other)]).exit_code == 0
    assert [t.target for _, t in platform_mappings().tables()] == [only_other]
    gone = CliRunner().invoke(main, ["status", "--table", only_working])
    assert gone.exit_code == 1 and f"no mapped table is named {only_working!r}" in gone.output


def test_mappings_add_reads_the_source_and_writes_a_valid_entry(
    local_stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cdc mappings add CLUSTER SCHEMA.TABLE`: key, partition column and proposed overrides from the source's
    information_schema; append_only with a warning without a key; an unrepresentable column named with the fix;
    the file validates afterwards (and is left unchanged on any refusal)."""
    for key, value in local_stack.environment().items():
        monkeypatch.setenv(key, value)  # the cluster's connection variables
    env = new_env(local_stack, "poker_accounts")
    run_sql(
        env,
        "CREATE TABLE `{schema}`.gamers (id BIGINT NOT NULL, region CHAR(2) NOT NULL, is_vip TINYINT(1), "
        "signup DATETIME(6) DEFAULT CURRENT_TIMESTAMP(6), PRIMARY KEY (region, id))",
        "CREATE TABLE `{schema}`.clicks (at TIMESTAMP(3) NULL DEFAULT NULL, created_at DATE, what VARCHAR(20))",
        "CREATE TABLE `{schema}`.places (id INT PRIMARY KEY, spot POINT)",
        "CREATE TABLE `{schema}`.dupe (id INT PRIMARY KEY)",
    )
    folder = tmp_path / "mappings"
    folder.mkdir()
    shipped = json.loads((SHIPPED / "poker_accounts.json").read_text())
    (folder / "poker_accounts.json").write_text(json.dumps({**shipped, "tables": shipped["tables"][:1]}))
    monkeypatch.setenv(MAPPINGS_DIR, str(folder))
    dataset = shipped["tables"][0]["target"].split(".")[0]

    def add(*args: str) -> Any:
        return CliRunner().invoke(main, ["mappings", "add", "poker_accounts", *args])

    gamers = add(f"{env.schema}.gamers")
    assert gamers.exit_code == 0, gamers.output
    assert "is_vip -> BOOL" in gamers.output and "proposed, not written" in gamers.output
    clicks = add(f"{env.schema}.clicks", "--target", f"{env.schema}.clicks", "--accept-overrides")
    assert clicks.exit_code == 0, clicks.output
    assert "has no primary key: mapped append_only" in clicks.output
    tables = {t.source: t for t in load_mappings(folder).cluster("poker_accounts").tables}
    added = tables[f"{env.schema}.gamers"]
    assert added.target == f"{dataset}.gamers" and added.primary_key == ["region", "id"]
    assert added.partition_column == "signup" and added.type_overrides == {}  # proposed only
    log = tables[f"{env.schema}.clicks"]
    assert log.append_only and log.primary_key == [] and log.partition_column == "created_at"

    before = (folder / "poker_accounts.json").read_text()
    for refused, message in (
        (
            add(f"{env.schema}.places"),
            "column spot has type point, which the capture cannot represent exactly",
        ),
        (add(f"{env.schema}.gamers"), "is already mapped"),
        (
            add(f"{env.schema}.dupe", "--target", shipped["tables"][0]["target"]),
            "the new entry does not validate",
        ),
        (add(f"{env.schema}.nowhere"), "does not exist at the source"),
        (
            CliRunner().invoke(main, ["mappings", "add", "no_such_cluster", "a.b"]),
            "no mapping file for cluster",
        ),
    ):
        assert refused.exit_code == 1 and message in refused.output, refused.output
    assert (folder / "poker_accounts.json").read_text() == before
