"""The whole pipeline running for a test: the real `cdc capture start` and `cdc dagster start` (daemon, sensor,
runs) on the session's local stack, for a mapping of the test's own tables; and waiting until BigQuery equals the
source."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from local_stack.processes import free_port
from local_stack.stack import LocalStack


@dataclass
class RunningPipeline:
    stack: LocalStack
    variables: dict[str, str]
    port: int
    env: Any = None  # the test's capture surroundings (tables, prefix), when a helper needs them

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cdc(self, *args: str) -> str:
        """Run a `cdc` command in the pipeline's environment; its output (a failure raises with its stderr)."""
        result = self.cdc_result(*args)
        if result.returncode != 0:
            raise AssertionError(
                f"cdc {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def cdc_result(self, *args: str) -> subprocess.CompletedProcess[str]:
        cdc = str(Path(sys.executable).with_name("cdc"))
        return subprocess.run(
            [cdc, *args], env=self.variables, capture_output=True, text=True, check=False, timeout=300
        )

    def dagster_log(self, chars: int = 3000) -> str:
        return (self.stack.state_dir / "dagster" / "dagster.log").read_text()[-chars:]


@contextmanager
def running_pipeline(
    stack: LocalStack, mappings_dir: Path, extra_env: dict[str, str] | None = None
) -> Iterator[RunningPipeline]:
    variables = {
        **os.environ,
        **stack.environment(),
        "CDC_MAPPINGS_DIR": str(mappings_dir),
        **(extra_env or {}),
    }
    pipeline = RunningPipeline(stack, variables, free_port())
    pipeline.cdc("capture", "start", "--flush-interval", "0.5")
    try:
        pipeline.cdc("dagster", "start", "--port", str(pipeline.port))
        yield pipeline
    finally:
        pipeline.cdc("dagster", "stop")
        pipeline.cdc("capture", "stop")


def wait_until_equal(check: Callable[[], None], pipeline: RunningPipeline, timeout: float = 150) -> float:
    """Call `check` (which asserts BigQuery equals the source) until it passes; return the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            check()
            return time.monotonic() - started
        except Exception as exc:
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"BigQuery did not reach the source state in {timeout:.0f} s ({exc}); dagster log:\n"
                    f"{pipeline.dagster_log()}"
                ) from None
            time.sleep(2)
