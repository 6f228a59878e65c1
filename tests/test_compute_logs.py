"""The instance's compute log manager: a step's stdout lands in the run's compute log file, as with Dagster's
default manager, but without the `tail -F` and watcher processes Dagster's default starts per step
(cdc_assets/compute_logs.py)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

OURS = {"module": "cdc_assets.compute_logs", "class": "FileComputeLogManager"}


def child_commands() -> list[str]:
    """The command lines of this process's children (from /proc)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and stat.rsplit(")", 1)[1].split()[1] == me:
                found.append((entry / "cmdline").read_text().replace("\0", " "))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(("compute_logs", "helpers"), [(None, 4), (OURS, 0)], ids=["dagster-default", "ours"])
def test_a_step_prints_into_its_compute_log_with_no_helper_process(
    compute_logs: dict[str, str] | None, helpers: int
) -> None:
    seen: dict[str, list[str]] = {}

    @dg.asset
    def printer() -> None:
        print("hello from the step")
        seen["children"] = child_commands()

    overrides = {"compute_logs": compute_logs} if compute_logs else {}
    with dg.instance_for_test(overrides=overrides) as instance:
        assert dg.materialize([printer], instance=instance).success
        outputs = list(Path(instance.root_directory, "storage").rglob("compute_logs/*.out"))
        assert [path.read_text() for path in outputs] == ["hello from the step\n"]
        assert len([c for c in seen["children"] if "tail -F" in c or "watch_orphans" in c]) == helpers
