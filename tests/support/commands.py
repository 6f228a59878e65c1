"""Running the real `cdc` console command from a test, as a user would."""

from __future__ import annotations

import os
import subprocess

from cdc.settings import installed_command


def run_cdc(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the real `cdc` console command, as a user would."""
    result = subprocess.run(
        [installed_command("cdc"), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"cdc {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result
