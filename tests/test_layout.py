"""The dependency rules of `make lint` hold, and would catch an upward import (docs/design.md, "Layout")."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cdc.settings import PROJECT_ROOT, installed_command

PACKAGES = ["cdc", "capture", "cdc_assets", "sensors", "cli", "local_stack", "bench", "cdc_testing"]


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [installed_command("lint-imports"), "--no-cache"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "definitions.py", root)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root)
    return root


def test_the_dependency_rules_hold(tmp_path: Path) -> None:
    result = _lint_imports(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_them(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    landing = root / "cdc" / "landing.py"  # the core reaching up into the Dagster code location
    landing.write_text(landing.read_text() + "\nfrom sensors.sqs_sensor import LOAD_RUN_TAG  # noqa: E402\n")
    result = _lint_imports(root)
    assert result.returncode != 0
    assert "cdc.landing -> sensors.sqs_sensor" in result.stdout
