"""A run's stdout and stderr captured into files, without a process per stream.

Dagster's `LocalComputeLogManager` (its default) mirrors each captured stream back to the run worker's terminal
through a `tail -F` process and a Python process watching for orphans - four processes started for every run (a
Python start-up each: CPU and ~10 MB per run on the hot path). `FileComputeLogManager` is the same manager, same
files and the same view in the UI, with the streams only redirected into the files. What the load steps log goes
to Dagster's event log, as before. Set by the instance configurations (deploy/*/dagster.yaml); docs/local-stack.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from dagster import Field, Float, StringSource
from dagster._core.execution.compute_logs import redirect_to_file
from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._serdes import ConfigurableClassData
from dagster._utils import ensure_file, touch_file


class FileComputeLogManager(LocalComputeLogManager):
    """`LocalComputeLogManager` without the terminal mirror; `base_dir` defaults to the instance's `storage`
    folder, as Dagster's default manager."""

    def __init__(
        self,
        base_dir: str | None = None,
        polling_timeout: float | None = None,
        inst_data: ConfigurableClassData | None = None,
    ):
        super().__init__(base_dir or "", polling_timeout, inst_data)
        self._base_dir_given = bool(base_dir)

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {
            "base_dir": Field(StringSource, is_required=False),
            "polling_timeout": Field(Float, is_required=False),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> FileComputeLogManager:
        return cls(inst_data=inst_data, **config_value)

    def register_instance(self, instance: Any) -> None:
        super().register_instance(instance)
        if not self._base_dir_given:
            self._base_dir = os.path.join(instance.root_directory, "storage")

    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        with ExitStack() as streams:
            # the process's streams as they are now (as Dagster's manager takes them), not as they were at import
            for io_type, stream in ((ComputeIOType.STDOUT, sys.stdout), (ComputeIOType.STDERR, sys.stderr)):
                path = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[io_type])
                ensure_file(path)
                streams.enter_context(redirect_to_file(stream, path))
            yield CapturedLogContext(log_key)
        # as Dagster's manager: the artifact that says the capture is complete
        touch_file(self.complete_artifact_path(log_key))
